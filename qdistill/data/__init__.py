"""Data: Fashion-MNIST, user datasets through a Python hook, and batching."""

from qdistill.data.dataset import Dataset, batches, epoch_order, load_user_dataset, random_shift_flip
from qdistill.data.fashion_mnist import load_fashion_mnist


FASHION_MNIST_VAL = 5000  # the last 5,000 training images: the validation split options are chosen on


def load_dataset(name: str = "fashion-mnist", data_dir=None, val_size: int | None = None) -> Dataset:
    """'fashion-mnist', or a user hook 'package.module:function' returning a Dataset.

    `val_size` training examples (the last ones) become the validation split unless the data bring
    their own; by default 5,000 for Fashion-MNIST and none for a hook's data."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir).holdout(FASHION_MNIST_VAL if val_size is None else val_size)
    data = load_user_dataset(name)
    return data.holdout(val_size) if val_size and data.val_x is None else data


__all__ = ["FASHION_MNIST_VAL", "Dataset", "batches", "epoch_order", "load_dataset", "load_fashion_mnist", "load_user_dataset", "random_shift_flip"]
