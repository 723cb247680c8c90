"""Data: Fashion-MNIST, user datasets through a Python hook, and batching."""

from qdistill.data.dataset import Dataset, batches, load_object, load_user_dataset, random_shift_flip
from qdistill.data.fashion_mnist import load_fashion_mnist


def load_dataset(name: str = "fashion-mnist", data_dir=None) -> Dataset:
    """'fashion-mnist', or a user hook 'package.module:function' returning a Dataset."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    return load_user_dataset(name)


__all__ = ["Dataset", "batches", "load_dataset", "load_fashion_mnist", "load_object", "load_user_dataset", "random_shift_flip"]
