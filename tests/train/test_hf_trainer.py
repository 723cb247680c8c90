"""Quantized distillation from a transformers.Trainer script: the student trains through its quantizers against
the teacher's logits, and a saved checkpoint is both a folder transformers opens and qdistill's packed file."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainingArguments  # noqa: E402

from qdistill import distillation_loss, load_packed, quantized_tensors  # noqa: E402
from qdistill.train.hf_trainer import PACKED, QuantizedDistillationTrainer  # noqa: E402
from tests.models.test_causal_lms import save_model, tokenizer_for  # noqa: E402
from tests.test_cli import text_folder  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainer")
    texts = text_folder(folder / "texts")
    tokenizer = tokenizer_for(texts)
    model_dir = save_model(folder / "llama", "llama", tokenizer)
    lines = [line for p in sorted(texts.iterdir()) for line in p.read_text().splitlines()]
    rows = [{"input_ids": tokenizer.encode(line)[:24]} for line in lines[:64]]
    return model_dir, tokenizer, rows


def make_trainer(setup, tmp_path, steps=20):
    model_dir, tokenizer, rows = setup
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    student = copy.deepcopy(teacher)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    tokenizer.pad_token = tokenizer.eos_token
    return QuantizedDistillationTrainer(student, args, teacher=teacher, bits=2, train_dataset=rows, data_collator=collator, processing_class=tokenizer), collator(rows[:16])


def test_the_loss_is_the_distillation_loss_of_the_quantized_student(setup, tmp_path):
    trainer, batch = make_trainer(setup, tmp_path)
    student, teacher = trainer.model, trainer.teacher
    assert quantized_tensors(student)  # attached before the optimizer is built: it steps the shadow weights
    features = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = distillation_loss(student(**features).logits[:, :-1], batch["labels"][:, 1:], teacher(**features).logits[:, :-1], 2.0, 0.7)
        assert torch.allclose(trainer.compute_loss(student, batch), expected)
        levels = student.model.layers[0].mlp.up_proj.weight.reshape(-1, 32)[0].unique()
    assert len(levels) <= 4  # 2 bits: each row group of 32 reads at most 4 values


def test_training_lowers_the_loss_and_a_checkpoint_opens_in_transformers_and_qdistill(setup, tmp_path):
    trainer, batch = make_trainer(setup, tmp_path)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch).item()
    assert after < 0.9 * before
    trainer.save_model(str(tmp_path / "saved"))
    packed, _ = load_packed(tmp_path / "saved" / PACKED)
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True).eval()
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        assert torch.equal(opened(ids).logits, packed.eval()(ids).logits)
        assert torch.equal(packed(ids).logits, trainer.model.eval()(ids).logits)  # the trained quantized model, bit for bit
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
