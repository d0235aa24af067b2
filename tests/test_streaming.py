"""Streaming prune and merge: the same folders as the in-memory paths, bit for bit, from tiny sharded checkpoints, with
at most one decoder layer in memory, and a killed prune that resumes at its first unfinished layer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY, make_tiny_model
from fixtures_hub import hub  # noqa: F401 - the local Hub fixture
from test_pruning import CALIB, char_tokenizer, random_ids
from spp_hf import MaskedLoRAConfig, SPPConfig, SPPMismatchError, get_spp_model
from spp_hf.adapters import streaming_merge
from spp_hf.adapters.merging import merge_to_folder
from spp_hf.cli import main
from spp_hf.hub.transfer import push_folder
from spp_hf.pruning import prune, save_pruned
from spp_hf.pruning import sequential, sparsegpt, streaming
from spp_hf.pruning.sequential import batch_size_for
from spp_hf.pruning.sparsegpt import Hessian
from spp_hf.pruning.streaming import StreamedCheckpoint, layer_part, parse_size, prune_to_folder
from spp_hf.storage import PartialModelFolder

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def save_checkpoint(path: Path, model: torch.nn.Module, tokenizer: bool = True) -> Path:
    """A sharded checkpoint (several safetensors files and an index), as large models are saved."""
    model.save_pretrained(path, max_shard_size="50KB")
    if tokenizer:
        char_tokenizer().save_pretrained(path)
    return path


def deep_llama(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": layers})).eval()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


def assert_same_folder(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bits), sparsity.json (but the time taken), card, configs and tokenizer."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    ja, jb = (json.loads((f / "sparsity.json").read_text()) for f in (a, b))
    for record in (ja, jb):
        record.pop("seconds", None)
    assert ja == jb
    for name in ("README.md", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).is_file() == (b / name).is_file(), name
        if (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def in_memory_prune(checkpoint: Path, out: Path, method: str, sparsity, dtype=None, **kwargs) -> Path:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **({"dtype": dtype} if dtype else {}))
    tokenizer = char_tokenizer() if (checkpoint / "tokenizer.json").is_file() else None
    report = prune(model, method, sparsity, progress=False, **kwargs)
    return save_pruned(model, tokenizer, out, report)


class LayerCounter:
    """Wraps StreamedCheckpoint.materialise: after each read, how many decoder layers hold real tensors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.most = 0
        self.reads = 0
        original = StreamedCheckpoint.materialise

        def counted(ckpt: StreamedCheckpoint, module, prefix, where) -> None:
            original(ckpt, module, prefix, where)
            self.reads += 1
            live = sum(any(p.device.type != "meta" for p in block.parameters()) for block in ckpt.layers)
            self.most = max(self.most, live)

        monkeypatch.setattr(StreamedCheckpoint, "materialise", counted)


@pytest.fixture
def no_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming must never load a whole model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# --------------------------------------------------------------------------- streaming prune = in-memory prune
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_streamed_prune_equals_in_memory(tmp_path, method, sparsity):
    checkpoint = save_checkpoint(tmp_path / "ckpt", make_tiny_model("llama"))
    ids = random_ids()
    expected = in_memory_prune(checkpoint, tmp_path / "memory", method, sparsity, calibration=ids, nsamples=8, seqlen=32)
    report = prune_to_folder(checkpoint, tmp_path / "streamed", method, sparsity, calibration=ids, nsamples=8, seqlen=32,
                             progress=False)  # fmt: skip
    assert_same_folder(expected, tmp_path / "streamed")
    assert report.modules == json.loads((expected / "sparsity.json").read_text())["modules"]
    original = make_tiny_model("llama").state_dict()
    assert all(torch.equal(value, original[key]) for key, value in folder_tensors(checkpoint).items())  # input untouched
    assert not list(tmp_path.glob(".streamed.spp-hf-*"))  # no partial or staging folder left


@pytest.mark.parametrize(
    "arch, saved, dtype, modules",
    [("gpt2", torch.float32, None, None), ("qwen2", torch.bfloat16, torch.float32, ["q_proj", "down_proj"]),
     ("mistral", torch.float32, torch.bfloat16, None)],
)  # fmt: skip
def test_streamed_prune_other_architectures_and_dtypes(tmp_path, arch, saved, dtype, modules):
    """Tied embeddings and Conv1D (gpt2), a bf16 checkpoint pruned in float32, a float32 one in bf16, a module subset;
    the output is sharded (small max_shard_size) and loads back with transformers."""
    checkpoint = save_checkpoint(tmp_path / "ckpt", make_tiny_model(arch).to(saved), tokenizer=False)
    ids = random_ids()
    kwargs = dict(calibration=ids, nsamples=8, seqlen=32, modules=modules)
    expected = in_memory_prune(checkpoint, tmp_path / "memory", "sparsegpt", "2:4", dtype=dtype, **kwargs)
    prune_to_folder(checkpoint, tmp_path / "streamed", "sparsegpt", "2:4", dtype=dtype, progress=False, max_shard_size="40KB", **kwargs)
    assert_same_folder(expected, tmp_path / "streamed")
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert reloaded.dtype == AutoModelForCausalLM.from_pretrained(expected).dtype


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_at_most_one_decoder_layer_in_memory(tmp_path, monkeypatch, no_whole_model, method):
    model = deep_llama(4)
    checkpoint = save_checkpoint(tmp_path / "ckpt", model)
    counter = LayerCounter(monkeypatch)
    prune_to_folder(checkpoint, tmp_path / "out", method, "2:4", calibration=random_ids(), nsamples=8, seqlen=32, progress=False)
    assert counter.most == 1 and counter.reads >= 8  # each layer read to prune it, then read back for sparsity.json


# --------------------------------------------------------------------------- what is in memory when
def test_embeddings_are_released_before_any_decoder_layer_runs(tmp_path, monkeypatch):
    """The capture is the only forward pass with the embeddings (and the tied head) in memory: every decoder-layer
    call (the batching check, the statistics, advancing to the next layer) runs after they were released, on one
    buffer of activations that each layer's outputs overwrite."""
    checkpoint = save_checkpoint(tmp_path / "ckpt", deep_llama(3))
    ckpts: list[StreamedCheckpoint] = []
    init = StreamedCheckpoint.__init__

    def remembered(self, *args, **kwargs) -> None:
        ckpts.append(self)
        init(self, *args, **kwargs)

    devices, buffers = [], set()
    run_block = sequential.run_block

    def checked(block, hidden, call):
        model = ckpts[-1].model
        devices.extend(m.weight.device.type for m in (model.get_input_embeddings(), model.get_output_embeddings()))
        return run_block(block, hidden, call)

    advance = streaming.advance

    def tracked(block, state) -> None:
        buffers.add(state.inps.untyped_storage().data_ptr())
        advance(block, state)
        buffers.add(state.inps.untyped_storage().data_ptr())

    monkeypatch.setattr(StreamedCheckpoint, "__init__", remembered)
    monkeypatch.setattr(sequential, "run_block", checked)
    monkeypatch.setattr(streaming, "advance", tracked)
    prune_to_folder(checkpoint, tmp_path / "out", "wanda", "2:4", calibration=random_ids(), nsamples=8, seqlen=32, progress=False)
    assert devices and set(devices) == {"meta"}
    assert len(buffers) == 1


def test_tensors_outside_the_layers_are_written_one_table_at_a_time(tmp_path, monkeypatch):
    """An untied head is read after the embeddings were written and freed, not beside them: the tensors outside the
    decoder layers go to parts no larger than the largest of them, in the streamed prune and the streamed merge."""
    checkpoint = save_checkpoint(tmp_path / "ckpt", make_tiny_model("llama"), tokenizer=False)  # untied
    groups = list(StreamedCheckpoint(checkpoint).rest_parts().values())
    assert groups == [["model.embed_tokens.weight"], ["model.norm.weight"], ["lm_head.weight"]]
    written = []
    write = PartialModelFolder.write

    def counted(self, part, tensors) -> None:
        if part.startswith("rest"):
            written.append(sum(t.nbytes for t in tensors.values()))
        write(self, part, tensors)

    monkeypatch.setattr(PartialModelFolder, "write", counted)
    prune_to_folder(checkpoint, tmp_path / "out", "magnitude", "2:4", progress=False)
    assert len(written) == 3 and max(written) == TINY["vocab_size"] * TINY["hidden_size"] * 4
    adapter = trained_adapter(tmp_path / "out", tmp_path / "adapter", SPPConfig(r=4, target_modules="all-linear"))
    written.clear()
    merge_to_folder(adapter, tmp_path / "merged", progress=False)
    assert len(written) == 3 and max(written) == TINY["vocab_size"] * TINY["hidden_size"] * 4


def test_streamed_prune_from_a_text_file_never_imports_datasets(tmp_path):
    """`datasets` (about 80 MB resident for the rest of the run) is imported only for calibration data that needs it."""
    checkpoint = save_checkpoint(tmp_path / "ckpt", make_tiny_model("llama"))
    argv = ["prune", "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--method", "wanda", "--sparsity", "2:4",
            "--calib", str(CALIB), "--nsamples", "4", "--seqlen", "32"]  # fmt: skip
    code = f"import sys\nfrom spp_hf.cli import main\nmain({argv!r})\nassert 'datasets' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "sparsity.json").is_file()


def test_block_calls_hold_about_one_block_of_activations():
    """A block call's widest activation is kept to a quarter of the block's parameters: LLaMA-7B's blocks keep 4096
    tokens per call, narrower blocks get fewer, and a call never holds less than one sample."""

    def block(hidden: int, intermediate: int, heads: int, kv_heads: int) -> torch.nn.Module:
        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=32)  # fmt: skip
        with torch.device("meta"):
            return LlamaForCausalLM(config).model.layers[0]

    assert batch_size_for(512) == 8 and batch_size_for(2048) == 2
    assert batch_size_for(512, block=block(4096, 11008, 32, 32)) == 8  # 202 M parameters, widest 11008: 4596 tokens
    assert batch_size_for(512, block=block(1024, 2048, 16, 4)) == 2  # 8.9 M parameters, widest 2048: 1087 tokens
    assert batch_size_for(2048, block=block(1024, 2048, 16, 4)) == 1


def test_a_hessian_inverse_consumes_its_sum():
    """SparseGPT's Hessian is inverted in the memory of its sum: the inverse is cached for the layers sharing it, and
    the sum is gone (more batches or another dampening are refused) instead of held beside the inverse."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    hessian, kept = Hessian(16), Hessian(16)
    hessian.add_batch(x)
    kept.add_batch(x)
    matrix = kept.matrix
    inverse = hessian.inverse_cholesky(0.01)
    assert hessian.xtx is None and hessian.inverse_cholesky(0.01) is inverse
    assert torch.equal(inverse, sparsegpt.inverse_cholesky(matrix, 0.01))  # the same bits as from a kept sum
    with pytest.raises(RuntimeError, match="consumed by its inverse"):
        hessian.add_batch(x)
    with pytest.raises(RuntimeError, match="consumed by its inverse"):
        hessian.inverse_cholesky(0.1)


# --------------------------------------------------------------------------- kill and resume
CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from spp_hf.adapters.merging import merge_to_folder
    from spp_hf.pruning.streaming import prune_to_folder
    from spp_hf.storage import PartialModelFolder

    write = PartialModelFolder.write

    def write_then_die(self, part, tensors):
        write(self, part, tensors)
        if part == {kill_after!r}:
            os.kill(os.getpid(), signal.SIGKILL)

    PartialModelFolder.write = write_then_die
    {call}
    """
)


def run_killed(call: str, kill_after: str) -> None:
    """Run `call` in a fresh process that SIGKILLs itself once it has written the part `kill_after`."""
    code = CHILD.format(kill_after=kill_after, call=call)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def run_killed_prune(tmp_path: Path, checkpoint: Path, out: Path, method: str, ids: torch.Tensor, kill_after: str) -> None:
    torch.save(ids, tmp_path / "ids.pt")
    run_killed(f"prune_to_folder({str(checkpoint)!r}, {str(out)!r}, {method!r}, '2:4', calibration=torch.load("
               f"{str(tmp_path / 'ids.pt')!r}), nsamples=8, seqlen=32, progress=False)", kill_after)  # fmt: skip


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_killed_prune_resumes_at_first_unfinished_layer(tmp_path, monkeypatch, method):
    checkpoint = save_checkpoint(tmp_path / "ckpt", deep_llama(4))
    ids = random_ids()
    out = tmp_path / "out"
    run_killed_prune(tmp_path, checkpoint, out, method, ids, kill_after=layer_part(2))
    assert not out.exists()  # the target is only ever written whole
    (partial,) = tmp_path.glob(".out.spp-hf-partial-*")
    done = {p.name.removesuffix(".safetensors") for p in partial.glob("*.safetensors")}
    rest = set(StreamedCheckpoint(checkpoint).rest_parts())
    assert rest | {layer_part(0), layer_part(1)} <= done  # layer 2 may still have been on its way to the disk

    pruned = []
    prune_block = streaming.prune_block
    monkeypatch.setattr(streaming, "prune_block", lambda block, name, *a: (pruned.append(name), prune_block(block, name, *a)))
    prune_to_folder(checkpoint, out, method, "2:4", calibration=ids, nsamples=8, seqlen=32, progress=False)
    assert pruned == [f"model.layers.{i}" for i in range(4) if layer_part(i) not in done]  # finished layers: not again
    assert not partial.exists()
    expected = in_memory_prune(checkpoint, tmp_path / "memory", method, "2:4", calibration=ids, nsamples=8, seqlen=32)
    assert_same_folder(expected, out)


def test_other_settings_do_not_reuse_a_killed_runs_layers(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "ckpt", deep_llama(4))
    out = tmp_path / "out"
    run_killed_prune(tmp_path, checkpoint, out, "wanda", random_ids(), kill_after=layer_part(2))
    (partial,) = tmp_path.glob(".out.spp-hf-partial-*")
    pruned = []
    prune_block = streaming.prune_block
    monkeypatch.setattr(streaming, "prune_block", lambda block, name, *a: (pruned.append(name), prune_block(block, name, *a)))
    ids = random_ids(seed=1)  # other calibration tokens: another run
    prune_to_folder(checkpoint, out, "wanda", "2:4", calibration=ids, nsamples=8, seqlen=32, progress=False)
    assert len(pruned) == 4 and not partial.exists() and not list(tmp_path.glob(".out.spp-hf-*"))
    assert_same_folder(in_memory_prune(checkpoint, tmp_path / "memory", "wanda", "2:4", calibration=ids, nsamples=8, seqlen=32), out)


# --------------------------------------------------------------------------- the CLI
def test_cli_prune_streams_and_matches_in_memory(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "ckpt", make_tiny_model("llama"))
    argv = ["prune", "--model", str(checkpoint), "--method", "sparsegpt", "--sparsity", "2:4", "--calib", str(CALIB),
            "--nsamples", "4", "--seqlen", "32"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "memory"), "--in-memory"]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("streaming loaded the whole model"))
        assert main([*argv, "--out", str(tmp_path / "streamed")]) == 0
    assert_same_folder(tmp_path / "memory", tmp_path / "streamed")
    record = json.loads((tmp_path / "streamed" / "sparsity.json").read_text())
    assert record["base_model"] == str(checkpoint) and record["pattern"] == "2:4"


# --------------------------------------------------------------------------- errors and the partial folder
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt", make_tiny_model("llama"))
    with pytest.raises(ValueError, match="not divisible by M=3"):
        prune_to_folder(checkpoint, tmp_path / "a", "magnitude", "2:3", progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        prune_to_folder(checkpoint, tmp_path / "a", "wanda", 0.5, calibration=torch.full((8, 32), 500), nsamples=8, seqlen=32)
    with pytest.raises(ValueError, match="max_shard_size"):
        prune_to_folder(checkpoint, tmp_path / "a", "magnitude", 0.5, max_shard_size="lots")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model folder spp-hf wrote"):
        prune_to_folder(checkpoint, user, "magnitude", 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "user"]  # nothing beside the targets either

    pickled = tmp_path / "pickled"
    pickled.mkdir()  # a config but no safetensors weights (e.g. pytorch_model.bin only)
    (pickled / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors checkpoints only"):
        prune_to_folder(pickled, tmp_path / "b", "magnitude", 0.5)


def test_partial_folder_keys_and_parts(tmp_path):
    target = tmp_path / "out"
    first = PartialModelFolder(target, "pruned-base", "a" * 16)
    first.write("rest", {"x": torch.ones(2)})
    first.flush()  # a part appears under its name once it is on disk
    assert first.has("rest") and not first.has("layer-00000") and not list(first.folder.glob(".*"))
    again = PartialModelFolder(target, "pruned-base", "a" * 16)
    assert again.folder == first.folder and again.has("rest")  # the same run finds its parts
    other = PartialModelFolder(target, "pruned-base", "b" * 16)
    assert not first.folder.exists() and other.folder.exists()  # another run removes them
    with pytest.raises(ValueError, match="hex digits"):
        PartialModelFolder(target, "pruned-base", "../x")
    with pytest.raises(ValueError, match="plain name"):
        other.path("../escape")


def test_partial_folder_writes_in_the_background_and_keeps_the_tensors(tmp_path, monkeypatch):
    """`write` returns before the part is on disk (the caller's next layer overlaps the disk work), the pending write
    holds the tensors after the caller dropped them, and a failed write is raised by `flush`, leaving nothing."""
    import threading

    from safetensors.torch import load_file

    from spp_hf import storage

    released, saved = threading.Event(), []
    real_save = storage.save_file

    def slow_save(tensors, path, metadata=None):
        saved.append(released.wait(timeout=30))  # True only if the caller went on while this write waited
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(storage, "save_file", slow_save)
    parts = PartialModelFolder(tmp_path / "out", "pruned-base", "c" * 16)
    weight = torch.arange(6.0).reshape(2, 3)
    parts.write("layer-00000", {"w": weight * 1})  # the only reference to the tensor is the pending write's
    assert not parts.has("layer-00000")
    released.set()
    parts.flush()
    assert saved == [True] and torch.equal(load_file(parts.path("layer-00000"))["w"], weight)

    def failing_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", failing_save)
    parts.write("layer-00001", {"w": weight})
    with pytest.raises(OSError, match="disk full"):
        parts.flush()
    assert not parts.has("layer-00001") and not list(parts.folder.glob(".*"))  # no half-written part, no temporary


def test_parse_size():
    assert parse_size("100MB") == 10**8 and parse_size("2GiB") == 2 * 2**30 and parse_size(4096) == 4096
    for bad in ("0MB", "-1", "big", 0):
        with pytest.raises(ValueError, match="positive size"):
            parse_size(bad)


# --------------------------------------------------------------------------- streaming merge = in-memory merge
def pruned_base(tmp_path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32) -> Path:
    """A pruned base as `spp-hf prune` writes it (sharded, with sparsity.json), in `dtype`."""
    checkpoint = save_checkpoint(tmp_path / f"dense-{arch}", make_tiny_model(arch).to(dtype), tokenizer=arch == "llama")
    out = tmp_path / f"base-{arch}"
    prune_to_folder(checkpoint, out, "wanda", "2:4", calibration=random_ids(), nsamples=8, seqlen=32, progress=False,
                    max_shard_size="40KB")  # fmt: skip
    return out


def trained_adapter(base: Path, out: Path, config) -> Path:
    """An adapter on `base` with random (non-trivial) factors, saved to `out`."""
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in model.spp_layers():
            for param in layer.adapter_parameters().values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "arch, dtype, config",
    [("llama", torch.float32, lambda: SPPConfig(r=4, target_modules="all-linear")),
     ("llama", torch.bfloat16, lambda: MaskedLoRAConfig(r=3, lora_alpha=6.0, target_modules=["q_proj", "down_proj"])),
     ("gpt2", torch.float32, lambda: SPPConfig(r=4, target_modules=["c_attn", "c_fc"]))],
)  # fmt: skip
def test_streamed_merge_equals_in_memory(tmp_path, monkeypatch, arch, dtype, config):
    base = pruned_base(tmp_path, arch, dtype)
    adapter = trained_adapter(base, tmp_path / "adapter", config())
    merge_to_folder(adapter, tmp_path / "memory", in_memory=True, progress=False)
    counter = LayerCounter(monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("streaming loaded the whole model"))
        merge_to_folder(adapter, tmp_path / "streamed", progress=False, max_shard_size="40KB")
    assert counter.most == 1
    assert_same_folder(tmp_path / "memory", tmp_path / "streamed")
    base_tensors, merged = folder_tensors(base), folder_tensors(tmp_path / "streamed")
    changed = [k for k in base_tensors if not torch.equal(base_tensors[k], merged[k])]
    assert changed and all((merged[k] == 0).equal(base_tensors[k] == 0) for k in changed)  # merged, zeros kept
    assert not list(tmp_path.glob(".streamed.spp-hf-*"))


def test_streamed_merge_refuses_a_base_with_other_zeros(tmp_path):
    base = pruned_base(tmp_path)
    adapter = trained_adapter(base, tmp_path / "adapter", SPPConfig(r=4, target_modules="all-linear"))
    other = tmp_path / "other"
    prune_to_folder(tmp_path / "dense-llama", other, "magnitude", "2:4", progress=False)
    with pytest.raises(SPPMismatchError, match="other zeros.*Nothing was written"):
        merge_to_folder(adapter, tmp_path / "merged", base_model=str(other), progress=False)
    assert not (tmp_path / "merged").exists()


def test_cli_merge_streams_by_default(tmp_path):
    base = pruned_base(tmp_path)
    adapter = trained_adapter(base, tmp_path / "adapter", SPPConfig(r=4, target_modules="all-linear"))
    assert main(["merge", str(adapter), "--out", str(tmp_path / "memory"), "--in-memory"]) == 0
    assert main(["merge", str(adapter), "--out", str(tmp_path / "streamed")]) == 0
    assert_same_folder(tmp_path / "memory", tmp_path / "streamed")
    assert json.loads((tmp_path / "streamed" / "sparsity.json").read_text())["kind"] == "spp-merged"


def test_streamed_merge_of_a_hub_adapter_and_base(tmp_path, hub, monkeypatch):  # noqa: F811 - fixture
    """The base and the adapter are Hub repos (a local Hub server): the base's files are downloaded, then streamed."""
    monkeypatch.setenv("HF_TOKEN", hub.token)
    base = pruned_base(tmp_path)
    push_folder(base, "user/tiny-base", token=hub.token)
    model = get_spp_model(AutoModelForCausalLM.from_pretrained("user/tiny-base"), SPPConfig(r=4))
    with torch.no_grad():
        for _, layer in model.spp_layers():
            layer.adapter_parameters()["spp_beta"].fill_(0.05)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["push", str(tmp_path / "adapter"), "user/tiny-spp"]) == 0
    assert main(["merge", "user/tiny-spp", "--out", str(tmp_path / "memory"), "--in-memory"]) == 0
    assert main(["merge", "user/tiny-spp", "--out", str(tmp_path / "streamed")]) == 0
    assert_same_folder(tmp_path / "memory", tmp_path / "streamed")


def test_killed_merge_resumes(tmp_path, monkeypatch):
    base = pruned_base(tmp_path)
    adapter = trained_adapter(base, tmp_path / "adapter", SPPConfig(r=4, target_modules="all-linear"))
    out = tmp_path / "merged"
    run_killed(f"merge_to_folder({str(adapter)!r}, {str(out)!r}, progress=False)", kill_after=layer_part(1))
    (partial,) = tmp_path.glob(".merged.spp-hf-partial-*")
    rest = set(StreamedCheckpoint(base).rest_parts())
    assert rest | {layer_part(0)} <= {p.name.removesuffix(".safetensors") for p in partial.glob("*.safetensors")}
    merged = []
    merge_layer = streaming_merge._merge_layer
    monkeypatch.setattr(streaming_merge, "_merge_layer", lambda block, prefix, *a: (merged.append(prefix), merge_layer(block, prefix, *a)))
    merge_to_folder(adapter, out, progress=False)
    assert "model.layers.0." not in merged and not partial.exists()
    merge_to_folder(adapter, tmp_path / "memory", in_memory=True, progress=False)
    assert_same_folder(tmp_path / "memory", out)
