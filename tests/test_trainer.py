"""SPPSFTTrainer: only α/β train, every TRL data format, adapter-only checkpoints, exact resume,
the sparsity guard, bitsandbytes optimizers and a 4-bit NF4 base (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from fixtures_hub import TOKEN, hub  # noqa: F401 - the fixture
from fixtures_trainer import alpaca_records, char_tokenizer, save_tiny_base, single_thread, spp_tensors, tiny_pruned_base  # noqa: F401
from safetensors.torch import load_file
from transformers import TrainerCallback

from spp_hf import SPPConfig, SPPModel, SPPSFTTrainer, get_spp_model
from spp_hf.adapters.spp import repeat_alpha
from spp_hf.training.trainer import SparsityGuardError, SPPSFTConfig, bf16_available
from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import write_model_folder

ADAPTER = {"spp_config.json", "spp_adapter.safetensors", "README.md"}
CHECKPOINT = ADAPTER | {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def text_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list([{"text": f"{r['instruction']}\n{r['output']}"} for r in alpaca_records(n)])


def config(tmp_path, **overrides) -> SPPSFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, max_length=48,
        learning_rate=4e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        gradient_checkpointing=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    values.update(overrides)
    return SPPSFTConfig(**values)


def trainer(tmp_path, model=None, dataset=None, spp=None, **overrides) -> SPPSFTTrainer:
    return SPPSFTTrainer(
        model if model is not None else tiny_pruned_base(),
        args=config(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else text_dataset(),
        processing_class=char_tokenizer(),
        spp_config=spp if spp is not None or model is not None else SPPConfig(r=4, dropout=0.0),
        dataset_name="tatsu-lab/alpaca (sample)",
    )


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "spp_" not in n}


def test_only_alpha_beta_train_and_the_base_is_untouched(tmp_path):
    t = trainer(tmp_path)
    before_base, before_spp = base_weights(t.model), spp_tensors(t.model)
    t.train()
    optimised = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for _, layer in t.model.spp_layers() for p in layer.adapter_parameters().values()}
    assert optimised == expected and len(expected) == 2 * 14
    after_base, after_spp = base_weights(t.model), spp_tensors(t.model)
    assert all(torch.equal(before_base[n], after_base[n]) for n in before_base)
    assert any(not torch.equal(before_spp[k], after_spp[k]) for k in before_spp if k.endswith("spp_beta"))


def test_peft_config_and_peft_models_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="spp_config"):
        SPPSFTTrainer(tiny_pruned_base(), args=config(tmp_path), train_dataset=text_dataset(),
                      processing_class=char_tokenizer(), peft_config=LoraConfig(r=4, target_modules=["q_proj"]))  # fmt: skip
    peft_model = get_peft_model(tiny_pruned_base(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT model"):
        SPPSFTTrainer(peft_model, args=config(tmp_path), train_dataset=text_dataset(), processing_class=char_tokenizer())


def test_an_existing_spp_model_is_trained_as_is_but_not_given_a_second_config(tmp_path):
    model = get_spp_model(tiny_pruned_base(), SPPConfig(r=8))
    with pytest.raises(ValueError, match="already has SPP layers"):
        trainer(tmp_path, model=model, spp=SPPConfig(r=4))
    t = trainer(tmp_path, model=model, max_steps=1)
    assert t.model is model and model.active_spp_config.r == 8


def test_a_config_fingerprinted_on_another_base_is_refused_before_any_change(tmp_path):
    from spp_hf import SPPLinear, SPPMismatchError

    other = get_spp_model(tiny_pruned_base(seed=1), SPPConfig(r=4)).active_spp_config.mask_fingerprint
    base = tiny_pruned_base()
    with pytest.raises(SPPMismatchError):
        trainer(tmp_path, model=base, spp=SPPConfig(r=4, mask_fingerprint=other))
    assert not any(isinstance(m, SPPLinear) for m in base.modules())


def _formats() -> dict[str, Dataset]:
    records = alpaca_records(8)
    return {
        "text": Dataset.from_list([{"text": r["instruction"] + "\n" + r["output"]} for r in records]),
        "messages": Dataset.from_list(
            [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]} for r in records]
        ),
        "prompt_completion": Dataset.from_list([{"prompt": r["instruction"][:24] + "\n", "completion": r["output"]} for r in records]),
    }


@pytest.mark.parametrize("fmt", ["text", "messages", "prompt_completion", "packing"])
def test_every_trl_dataset_format_trains(tmp_path, fmt):
    data = _formats()["text" if fmt == "packing" else fmt]
    extra = dict(packing=True, packing_strategy="wrapped") if fmt == "packing" else {}
    t = trainer(tmp_path, dataset=data, max_steps=2, **extra)
    before = spp_tensors(t.model)
    t.train()
    assert any(not torch.equal(before[k], v) for k, v in spp_tensors(t.model).items())
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    example = t.train_dataset[0]
    if fmt == "prompt_completion":  # completion-only loss: the prompt's characters carry label -100
        assert len(t.train_dataset) == len(data)
        for row in t.train_dataset:
            n = len(row["prompt"])  # one token per character
            assert row["labels"][:n] == [-100] * n and -100 not in row["labels"][n:]
    elif fmt == "packing":
        assert len(example["input_ids"]) == 48  # wrapped packing fills max_length
    else:
        assert -100 not in example["labels"]


def test_gradient_checkpointing_gives_the_same_updates(tmp_path):
    results = []
    for gc in (False, True):
        t = trainer(tmp_path / str(gc), max_steps=2, optim="sgd", learning_rate=0.5, gradient_checkpointing=gc, lr_scheduler_type="constant")
        t.train()
        results.append(spp_tensors(t.model))
    plain, checkpointed = results
    assert any(plain[k].abs().sum() > 0 for k in plain if k.endswith("spp_beta"))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["naive", "blocked", "fused"])
def test_bf16_defaults_off_on_cpu_and_the_bf16_path_trains_a_tiny_model(tmp_path, impl):
    assert config(tmp_path).bf16 is bf16_available()
    t = trainer(tmp_path, spp=SPPConfig(r=4, impl=impl), max_steps=1, bf16=True)
    t.train()
    assert t.model.model.layers[0].self_attn.q_proj.spp_alpha["default"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in spp_tensors(t.model).values())


def test_checkpoints_and_final_save_hold_only_the_adapter(tmp_path):
    t = trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    t.train()
    t.save_model()
    out = tmp_path / "out"
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == CHECKPOINT
    assert ADAPTER <= {p.name for p in out.iterdir()}
    assert not list(out.rglob("model*.safetensors")) and not list(out.rglob("*.bin"))
    saved = load_file(out / "spp_adapter.safetensors")
    own = t.model.spp_state_dict()
    assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in own)
    cfg = json.loads((out / "spp_config.json").read_text())
    assert cfg["r"] == 4 and cfg["mask_fingerprint"]["hash"] == t.spp_start_fingerprint["hash"]
    from huggingface_hub import ModelCard

    card = ModelCard((out / "README.md").read_text())
    assert {"spp", "sparse"} <= set(card.data.tags) and card.data.base_model is None  # a local base is not a Hub id
    assert "tatsu-lab/alpaca (sample)" in card.text and f"{t.final_loss():.4f}" in card.text
    assert "SPPModel.from_pretrained(" in card.text and "learning_rate" in card.text


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    spp = dict(r=4, dropout=0.05)  # dropout makes the RNG state part of what must be restored
    full = trainer(tmp_path / "a", spp=SPPConfig(**spp), max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    expected = spp_tensors(full.model)

    torch.manual_seed(1234)  # a differently initialised adapter: everything must come from the checkpoint
    model = get_spp_model(tiny_pruned_base(), SPPConfig(**spp))
    resumed = trainer(tmp_path / "b", model=model, max_steps=6, save_strategy="steps", save_steps=3)
    assert not torch.equal(spp_tensors(model)["model.layers.0.self_attn.q_proj.spp_alpha"],
                           load_file(tmp_path / "a/out/checkpoint-3/spp_adapter.safetensors")["model.layers.0.self_attn.q_proj.spp_alpha"])  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "a/out/checkpoint-3"))
    got = spp_tensors(resumed.model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.state.global_step == 6


def test_resume_needs_an_spp_checkpoint(tmp_path):
    bogus = tmp_path / "checkpoint-1"
    bogus.mkdir()
    (bogus / "model.safetensors").write_bytes(b"")
    t = trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="spp_adapter.safetensors"):
        t.train(resume_from_checkpoint=str(bogus))


def test_resume_with_a_named_active_adapter(tmp_path):
    """The active adapter "task" (besides "default") is written at the checkpoint root and resumed from there."""
    def build(seed):
        torch.manual_seed(seed)
        model = get_spp_model(tiny_pruned_base(), SPPConfig(r=8))
        model.add_adapter(SPPConfig(r=4), adapter_name="task")
        return model

    full = trainer(tmp_path / "a", model=build(0), max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    expected = spp_tensors(full.model)
    checkpoint = tmp_path / "a/out/checkpoint-2"
    assert (checkpoint / "spp_adapter.safetensors").is_file() and not (checkpoint / "task").exists()
    resumed = trainer(tmp_path / "b", model=build(1), max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.model.active_spp_adapter == "task"
    got = spp_tensors(resumed.model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    t = trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    t.train()
    checkpoint = tmp_path / "out/checkpoint-2"
    (checkpoint / "spp_adapter.safetensors").write_bytes(b"\x00" * 64)
    again = trainer(tmp_path / "b", max_steps=3)
    with pytest.raises(ValueError, match=r"Can't resume from .*checkpoint-2.*corrupt"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_checkpoint_weights_keep_the_conv1d_layout_of_square_weights(tmp_path):
    """GPT-2 stores every Conv1D weight as (in, out), square ones included: read them by layer type, not shape."""
    from conftest import make_tiny_model, prune_magnitude_nm_
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from spp_hf.training.trainer import _checkpoint_weights, _stored_transposed

    base = make_tiny_model("gpt2")
    prune_magnitude_nm_(base)
    base.save_pretrained(tmp_path / "gpt2")
    model = get_spp_model(base, SPPConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    names = [n for n, _ in model.spp_layers()]
    assert any(tuple(model.get_submodule(n).weight.shape) == (64, 64) for n in names)  # attn.c_proj is square
    got = dict(_checkpoint_weights(str(tmp_path / "gpt2"), None, model, names))
    for name in names:
        assert torch.equal(got[name], model.get_submodule(name).weight), name
    replaced = nn.Linear(4, 4)  # what bitsandbytes leaves in place of a Conv1D (it records source_cls)
    replaced.source_cls = Conv1D
    assert _stored_transposed(replaced) and not _stored_transposed(nn.Linear(4, 4))


class FillAZero(TrainerCallback):
    """Writes into the frozen base (a pruned zero becomes 1.0) after step 1."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            weight = model.model.layers[1].mlp.up_proj.base_layer.weight
            with torch.no_grad():
                index = (weight == 0).nonzero()[0]
                weight[index[0], index[1]] = 1.0


def test_sparsity_guard_stops_training_before_saving(tmp_path):
    t = trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    t.add_callback(FillAZero())
    with pytest.raises(SparsityGuardError, match=r"model\.layers\.1\.mlp\.up_proj"):
        t.train()
    assert not (tmp_path / "out/checkpoint-2/spp_adapter.safetensors").exists()
    assert t.state.global_step == 2


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    t = SPPSFTTrainer(
        tiny_pruned_base(),
        args=config(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                    load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=5e-2),  # fmt: skip
        train_dataset=text_dataset(),
        eval_dataset=text_dataset(4),
        processing_class=char_tokenizer(),
        spp_config=SPPConfig(r=4),
    )
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None
    saved = load_file(f"{best}/spp_adapter.safetensors")
    got = spp_tensors(t.model)
    assert all(torch.equal(saved[k], got[k]) for k in saved)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_pass_through(tmp_path, optim):
    t = trainer(tmp_path, max_steps=2, optim=optim)
    before = spp_tensors(t.model)
    t.train()
    inner = getattr(t.optimizer, "optimizer", t.optimizer)
    assert type(inner).__module__.startswith("bitsandbytes")
    assert any(not torch.equal(before[k], v) for k, v in spp_tensors(t.model).items())


def _nf4_trainer(tmp_path, base_dir, device_map=None):
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    args = config(tmp_path, max_steps=3, model_init_kwargs={"device_map": device_map} if device_map else None)
    return SPPSFTTrainer(str(base_dir), args=args, train_dataset=text_dataset(), quantization_config=quant,
                         spp_config=SPPConfig(r=4, impl="blocked"))  # fmt: skip


def _check_merge_onto_full_precision(adapter_dir, base_dir):
    from transformers import AutoModelForCausalLM

    fp_base = AutoModelForCausalLM.from_pretrained(base_dir)
    merged = SPPModel.from_pretrained(adapter_dir, base_model=str(base_dir))
    state = load_file(adapter_dir / "spp_adapter.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = fp_base.get_submodule(name).weight.detach()
        alpha, beta = state[f"{name}.spp_alpha"], state[f"{name}.spp_beta"]
        expected = w * (1 + 2.0 * repeat_alpha(alpha, w.shape[0]) * beta)  # W + s·W', Eq. 4-5
        got = merged.get_submodule(name).weight.detach()
        torch.testing.assert_close(got, expected)
        assert torch.equal(got == 0, w == 0)


def test_nf4_base_trains_and_the_adapter_merges_onto_the_full_precision_base(tmp_path):
    base_dir = save_tiny_base(tmp_path / "base")
    t = _nf4_trainer(tmp_path, base_dir)
    layer = t.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.spp_alpha["default"].dtype == torch.float32
    t.train()
    assert t.model.active_spp_config.mask_fingerprint != t.spp_start_fingerprint  # NF4 rounds a few weights to 0
    t.save_model()
    _check_merge_onto_full_precision(tmp_path / "out", base_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf4_base_on_gpu_with_bf16(tmp_path):
    base_dir = save_tiny_base(tmp_path / "base")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    args = config(tmp_path, max_steps=3, use_cpu=False, bf16=True, optim="paged_adamw_8bit", gradient_checkpointing=True)
    t = SPPSFTTrainer(str(base_dir), args=args, train_dataset=text_dataset(), quantization_config=quant,
                      spp_config=SPPConfig(r=4, impl="blocked"))  # fmt: skip
    t.train()
    t.save_model()
    _check_merge_onto_full_precision(tmp_path / "out", base_dir)


def push_tiny_base(tmp_path, repo_id: str) -> str:
    """Push the tiny pruned base with its sparsity.json (as spp-hf writes it) and return the commit sha."""
    from spp_hf.hub.transfer import push_folder

    base = tiny_pruned_base()
    write_model_folder(base, char_tokenizer(), tmp_path / "base", "# tiny base\n", model_sparsity_record(base, "pruned-base"))
    return push_folder(tmp_path / "base", repo_id, token=TOKEN).oid


def test_push_to_hub_uploads_the_adapter_with_its_card(hub, tmp_path):  # noqa: F811
    """The trainer's pushes go through hub.push_adapter_folder: the adapter is keyed to its base on the Hub."""
    from transformers import AutoModelForCausalLM

    repo_id, base_repo = "user/tiny-spp-sft", "user/tiny-base"
    base_sha = push_tiny_base(tmp_path, base_repo)
    base = AutoModelForCausalLM.from_pretrained(base_repo, token=TOKEN)
    t = trainer(tmp_path, model=base, spp=SPPConfig(r=4), max_steps=2, save_strategy="steps", save_steps=1,
                push_to_hub=True, hub_model_id=repo_id, hub_token=TOKEN)  # fmt: skip
    t.train()
    repo = hub.state.repo(repo_id)
    assert len(repo.commits) == 3  # the repo's initial commit, then one push per checkpoint (hub_strategy every_save)
    assert "spp_adapter.safetensors" in repo.resolve("main").files
    t.push_to_hub()
    files = repo.resolve("main").files
    assert set(files) == {".gitattributes", "spp_config.json", "spp_adapter.safetensors", "README.md"}
    pushed_config = json.loads(files["spp_config.json"])
    assert (pushed_config["base_model_name_or_path"], pushed_config["base_model_revision"]) == (base_repo, base_sha)
    card = files["README.md"].decode()
    assert f'SPPModel.from_pretrained("{repo_id}"' in card and "tatsu-lab/alpaca (sample)" in card
    assert f"{t.final_loss():.4f}" in card
    from huggingface_hub import ModelCard

    assert {"spp", "sparse"} <= set(ModelCard(card).data.tags)
    path = tmp_path / "pushed.safetensors"
    path.write_bytes(files["spp_adapter.safetensors"])
    pushed, own = load_file(path), t.model.spp_state_dict()
    assert set(pushed) == set(own) and all(torch.equal(pushed[k], own[k]) for k in own)


def test_push_to_hub_with_a_local_base_is_refused_before_training(tmp_path, monkeypatch):
    """The first push would refuse a base that is not on the Hub, after training: refuse in the constructor."""
    from trl import SFTTrainer

    from spp_hf.hub.transfer import SPPHubError

    def never(*args, **kwargs):
        raise AssertionError("the refused trainer loaded the base or started setting up training")

    base_dir = save_tiny_base(tmp_path / "base")
    monkeypatch.setattr(SFTTrainer, "__init__", never)
    monkeypatch.setattr(SPPSFTTrainer, "_load_base", staticmethod(never))
    for model in (str(base_dir), tiny_pruned_base(), get_spp_model(tiny_pruned_base(), SPPConfig(r=4))):
        with pytest.raises(SPPHubError, match=r"push_to_hub.*not a Hub repo.*SPPConfig\(base_model_name_or_path=.*--base ORG/NAME"):
            trainer(tmp_path, model=model, max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True,
                    hub_model_id="user/x")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_push_to_hub_with_a_local_base_named_on_the_hub(hub, tmp_path):  # noqa: F811
    """The fix the refusal names: the adapter config names the Hub copy of the local base."""
    base_repo = "user/tiny-base"
    base_sha = push_tiny_base(tmp_path, base_repo)
    base_dir = save_tiny_base(tmp_path / "local-base")
    t = trainer(tmp_path, model=str(base_dir), spp=SPPConfig(r=4, base_model_name_or_path=base_repo), max_steps=1,
                push_to_hub=True, hub_model_id="user/tiny-spp-sft", hub_token=TOKEN)  # fmt: skip
    t.push_to_hub()
    pushed = json.loads(hub.state.repo("user/tiny-spp-sft").resolve("main").files["spp_config.json"])
    assert (pushed["base_model_name_or_path"], pushed["base_model_revision"]) == (base_repo, base_sha)
