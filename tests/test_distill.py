"""Distillation from the dense model: the loss against plain formulas and transformers' own loss,
and the teacher in SPPSFTTrainer and in the PEFT trainer used for LoRA* (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from datasets import Dataset
from fixtures_trainer import alpaca_records, char_tokenizer, single_thread, spp_tensors, tiny_pruned_base  # noqa: F401

from spp_hf import SPPConfig, SPPSFTTrainer
from spp_hf.training import distillation
from spp_hf.training.distillation import DistillSFTTrainer, distillation_loss, feature_distillation_loss
from spp_hf.training.trainer import SPPSFTConfig


def _batch(seed: int = 0, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 7, vocab, generator=g), torch.randn(2, 7, vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[0, :3] = -100  # an ignored prompt
    return student, teacher, labels


def test_weight_zero_is_transformers_causal_lm_loss():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100
    out = model(input_ids=ids, labels=labels)
    ours = distillation_loss(out.logits, torch.zeros_like(out.logits), labels, weight=0.0)
    torch.testing.assert_close(ours, out.loss)


def test_kl_term_matches_the_definition_per_labelled_token():
    student, teacher, labels = _batch()
    T = 2.0
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(6):
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher[b, t] / T, -1)
            q = torch.softmax(student[b, t] / T, -1)
            expected += T * T * float((p * (p.log() - q.log())).sum())
            count += 1
    got = distillation_loss(student, teacher, labels, weight=1.0, temperature=T)
    assert abs(float(got) - expected / count) < 1e-5
    assert float(distillation_loss(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 2**22])
def test_gradient_is_autograd_through_the_definition(monkeypatch, chunk):
    """The chunked KL's own gradient equals autograd through F.kl_div on the labelled rows (float64), for chunks
    of one row, of a few rows and of all rows; unlabelled rows get none."""
    monkeypatch.setattr(distillation, "KL_CHUNK_ELEMENTS", chunk * 11)
    student, teacher, labels = _batch()
    student, teacher = student.double(), teacher.double()
    T, w = 2.0, 0.7

    def reference(s: torch.Tensor) -> torch.Tensor:
        mask = labels[:, 1:] != -100
        rows_s, rows_t = s[:, :-1][mask], teacher[:, :-1][mask]
        ce = F.cross_entropy(rows_s, labels[:, 1:][mask], reduction="sum")
        kl = F.kl_div(F.log_softmax(rows_s / T, -1), F.log_softmax(rows_t / T, -1), log_target=True, reduction="sum")
        return ((1 - w) * ce + w * T * T * kl) / 40

    expected_s = student.clone().requires_grad_(True)
    reference(expected_s).backward()
    got_s = student.clone().requires_grad_(True)
    loss = distillation_loss(got_s, teacher, labels, weight=w, temperature=T, num_items=40)
    loss.backward()
    torch.testing.assert_close(loss, reference(student), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_s.grad, expected_s.grad, rtol=1e-6, atol=1e-9)
    assert got_s.grad[:, -1].abs().sum() == 0 and got_s.grad[0, :2].abs().sum() == 0  # no label after them


def test_bf16_logits_get_a_bf16_gradient():
    student, teacher, labels = _batch()
    student = student.bfloat16().requires_grad_(True)
    distillation_loss(student, teacher.bfloat16(), labels).backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()


def test_mixed_weight_and_num_items():
    student, teacher, labels = _batch(1)
    ce = distillation_loss(student, teacher, labels, weight=0.0)
    kl = distillation_loss(student, teacher, labels, weight=1.0)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, weight=0.25), 0.75 * ce + 0.25 * kl)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(distillation_loss(student, teacher, labels, num_items=4 * n), kl / 4)


def test_a_teacher_with_another_vocabulary_is_refused():
    student, _, labels = _batch()
    with pytest.raises(ValueError, match="teacher must be the dense model"):
        distillation_loss(student, torch.zeros(2, 7, 12), labels)


def _args(tmp_path, **overrides) -> SPPSFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, max_length=48, learning_rate=2e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, gradient_checkpointing=False,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, packing=True, packing_strategy="wrapped",
    )  # fmt: skip
    values.update(overrides)
    return SPPSFTConfig(**values)


def _data() -> Dataset:
    return Dataset.from_list([{"text": f"{r['instruction']}\n{r['output']}"} for r in alpaca_records(16)])


def _spp_trainer(tmp_path, **distill) -> SPPSFTTrainer:
    return SPPSFTTrainer(
        tiny_pruned_base(), args=_args(tmp_path), train_dataset=_data(), processing_class=char_tokenizer(),
        spp_config=SPPConfig(r=4), **distill,
    )  # fmt: skip


def _kl_to(teacher, model, dataset) -> float:
    batch = torch.tensor([dataset[i]["input_ids"] for i in range(4)])
    with torch.no_grad():
        return float(distillation_loss(model(input_ids=batch).logits, teacher(input_ids=batch).logits, batch))


def test_feature_loss_is_squarehead_normalised_mse_per_layer():
    """mean over layers of Σ‖h_s − h_t‖² / Σ‖h_t‖² over attended tokens, written out token by token."""
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 5, 4, generator=g) * (layer + 1) for layer in range(3)]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding
    per_layer = []
    for s, t in zip(student, teacher):
        num = den = 0.0
        for b in range(2):
            for pos in range(5):
                if mask[b, pos]:
                    num += float(((s[b, pos] - t[b, pos]) ** 2).sum())
                    den += float((t[b, pos] ** 2).sum())
        per_layer.append(num / den)
    got = feature_distillation_loss(student, teacher, mask)
    assert abs(float(got) - sum(per_layer) / 3) < 1e-5
    assert float(feature_distillation_loss(teacher, teacher)) == 0.0
    with pytest.raises(ValueError, match="same depth"):
        feature_distillation_loss(student[:2], teacher)


def test_feature_distillation_moves_hidden_states_towards_the_teacher(tmp_path):
    """The same KL training with and without a weighted feature term: only the feature term's run ends with
    hidden states closer to the dense teacher's (so the term is applied and pulls the right way)."""
    teacher = make_tiny_model("llama", seed=0)

    def feature_gap(trainer) -> float:
        ids = torch.tensor([trainer.train_dataset[i]["input_ids"] for i in range(4)])
        trainer.model.eval()
        with torch.no_grad():
            s = trainer.model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
            h = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        return float(feature_distillation_loss(s, h))

    gaps = {}
    for weight in (0.0, 10.0):
        trainer = _spp_trainer(tmp_path / str(weight), teacher_model=teacher, distill_weight=1.0, feature_weight=weight)
        before = feature_gap(trainer)
        trainer.train()
        gaps[weight] = feature_gap(trainer)
    assert gaps[10.0] < before and gaps[10.0] < gaps[0.0]
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        _spp_trainer(tmp_path / "bad", teacher_model=teacher, feature_weight=-1.0)


def test_spp_with_weight_zero_trains_exactly_as_without_a_teacher(tmp_path):
    plain = _spp_trainer(tmp_path / "a")
    plain.train()
    taught = _spp_trainer(tmp_path / "b", teacher_model=make_tiny_model("llama", seed=1), distill_weight=0.0)
    taught.train()
    a, b = spp_tensors(plain.model), spp_tensors(taught.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_spp_distillation_moves_the_student_towards_the_teacher_and_saves_only_the_adapter(tmp_path):
    teacher = make_tiny_model("llama", seed=0)  # the dense model the tiny base was pruned from
    t = _spp_trainer(tmp_path, teacher_model=teacher, distill_weight=1.0)
    before = _kl_to(teacher, t.model, t.train_dataset)
    t.train()
    after = _kl_to(teacher, t.model, t.train_dataset)
    assert after < before
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    t.save_model()
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"spp_adapter.safetensors", "spp_config.json"}
    assert not list((tmp_path / "out").rglob("model*.safetensors"))


def test_peft_trainer_distils_lora(tmp_path):
    from peft import LoraConfig

    teacher = make_tiny_model("llama", seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    t = DistillSFTTrainer(
        tiny_pruned_base(), args=_args(tmp_path, learning_rate=1e-2), train_dataset=_data(),
        processing_class=char_tokenizer(), peft_config=lora, teacher_model=teacher,
    )  # fmt: skip
    before = _kl_to(teacher, t.model, t.train_dataset)
    t.train()
    assert _kl_to(teacher, t.model, t.train_dataset) < before


def test_bad_distillation_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="distill_weight must be in"):
        _spp_trainer(tmp_path, teacher_model=make_tiny_model("llama"), distill_weight=1.5)
    with pytest.raises(TypeError, match="loaded model"):
        _spp_trainer(tmp_path, teacher_model="HuggingFaceTB/SmolLM2-135M")
