"""Evaluation of dense, pruned, SPP and merged models: WikiText-2 perplexity and zero-shot accuracy.

Perplexity follows Wanda/SparseGPT (test split joined with "\\n\\n", tokenized once, non-overlapping
windows). Zero-shot accuracy runs lm-evaluation-harness on the model object: the paper's tasks by name
when the Hub is reachable, or the small subsets bundled with spp-hf (`spp_*` tasks in `spp_hf/data/tasks/`).
`evaluation_record` measures a model into the one record schema (`spp_hf.pipeline.results.EvalRecord`) that
`spp-hf eval` (`spp_hf.pipeline.evaluate_model`) and the pipeline's eval stage both write.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import constants
from huggingface_hub.utils import get_session
from tqdm.auto import tqdm

from ..data.corpora import DATA_DIR, documents
from ..sparsity import sparsity_report
from ..version import __version__
from .results import WIKITEXT2, EvalRecord

TASKS_DIR = DATA_DIR / "tasks"
WIKITEXT2_FILE = DATA_DIR / "wikitext2" / "test.jsonl"

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TASKS = ("spp_boolq", "spp_arc_easy", "spp_arc_challenge", "spp_openbookqa", "spp_copa")
TASK_SETS = {"offline": OFFLINE_TASKS, "bundled": OFFLINE_TASKS, "paper": PAPER_TASKS}
DEFAULT_FEWSHOT = {"mmlu": 5}  # the paper's protocol; every other task is zero-shot
DEFAULT_SEQLEN_CAP = 2048  # LLaMA-1's context, as in Wanda/SparseGPT; longer contexts are slow on CPUs


# --------------------------------------------------------------------------- data
def offline_mode() -> bool:
    """True when the user asked huggingface_hub not to use the network (HF_HUB_OFFLINE): huggingface_hub's
    own answer, the one spp-hf asks everywhere (datasets and transformers follow the same variable)."""
    return constants.is_offline_mode()


@functools.lru_cache(maxsize=1)
def hub_available(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within `timeout` seconds (False at once in offline mode).

    `datasets` retries for tens of seconds before failing without a network, so we probe first and use the
    bundled data when the Hub cannot be reached.
    """
    if offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport error means "not reachable"
        return False
    return True


def _read_bundled_wikitext2() -> list[str]:
    with WIKITEXT2_FILE.open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def _load_wikitext2(source: str = "auto") -> tuple[list[str], str]:
    """(rows, where they came from: "hub" or "bundled")."""
    if source not in ("auto", "hub", "bundled"):
        raise ValueError(f"source must be 'auto', 'hub' or 'bundled', not {source!r}.")
    if source == "bundled" or (source == "auto" and not hub_available()):
        return _read_bundled_wikitext2(), "bundled"
    try:
        import datasets  # slow to import, and only needed when the Hub is reachable

        rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return list(rows), "hub"
    except Exception as err:
        if source == "hub":
            raise
        warnings.warn(f"Could not load WikiText-2 from the Hub ({err}); using the bundled copy (identical rows).", stacklevel=3)
        return _read_bundled_wikitext2(), "bundled"


def load_wikitext2_test(source: str = "auto") -> list[str]:
    """Rows of WikiText-2 raw (`wikitext-2-raw-v1`) test, as `datasets` gives them (4358 rows).

    `source="auto"` uses the Hub when it is reachable and the bundled copy otherwise (also when
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); "hub" or "bundled" force one.
    """
    return _load_wikitext2(source)[0]


# --------------------------------------------------------------------------- perplexity
@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    seqlen: int
    windows: int
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    total_tokens: int  # tokens in the whole text
    source: str | None = None  # "hub", "bundled", or None for user text


def default_seqlen(model: torch.nn.Module, cap: int = DEFAULT_SEQLEN_CAP) -> int:
    """The model's context length (max_position_embeddings or n_positions), capped at `cap`."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def window_spans(num_tokens: int, seqlen: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows of `seqlen` tokens: floor(num_tokens / seqlen), or the first `max_windows`."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one token of context, one to predict), not {seqlen}.")
    count = num_tokens // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return [(i * seqlen, (i + 1) * seqlen) for i in range(count)]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity_result(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    source: str = "auto",
) -> PerplexityResult:
    """`perplexity` with its bookkeeping (windows, tokens, data source)."""
    origin = None
    if text is None:
        rows, origin = _load_wikitext2(source)
        text = "\n\n".join(rows)  # SparseGPT's join (Wanda joins with " ")
    seqlen = seqlen or default_seqlen(model)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    spans = window_spans(len(ids), seqlen, max_windows)
    if not spans:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}: pass a smaller seqlen.")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_nll, predicted = 0.0, 0
    try:
        with torch.no_grad(), tqdm(total=len(spans), desc=f"perplexity (seqlen {seqlen})", unit="window") as bar:
            for first in range(0, len(spans), batch_size):
                batch = torch.stack([ids[s:e] for s, e in spans[first : first + batch_size]]).to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                for row in range(batch.shape[0]):  # one row at a time keeps the fp32 copy of the logits small
                    total_nll += F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum").item()
                predicted += batch[:, 1:].numel()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    nll = total_nll / predicted
    return PerplexityResult(math.exp(nll), nll, seqlen, len(spans), predicted, len(ids), origin)


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> float:
    """Perplexity of `text` (default: WikiText-2 raw test) over non-overlapping windows of `seqlen` tokens.

    exp of the mean next-token NLL over every window (each window is scored on its own, shifted by one),
    as in Wanda/SparseGPT. `seqlen` defaults to the model's context capped at 2048; `max_windows` keeps
    only the first windows (for quick checks). Inputs go to `device` (default: the model's device).
    """
    return perplexity_result(model, tokenizer, text, seqlen, max_windows, batch_size, device).ppl


def corpus_perplexity(
    model: torch.nn.Module, tokenizer: Any, name: str, seqlen: int | None = None, max_windows: int | None = None, batch_size: int = 1
) -> PerplexityResult:
    """Perplexity on a bundled corpus (`spp_hf.data.corpora`, e.g. the held-out 'wiki-validation' or 'c4-heldout'):
    its documents joined with "\\n\\n" as WikiText-2's rows are, scored like WikiText-2."""
    found = perplexity_result(model, tokenizer, "\n\n".join(documents(name)), seqlen, max_windows, batch_size)
    found.source = name
    return found


# --------------------------------------------------------------------------- zero-shot (lm-eval)
def resolve_tasks(spec: str | Sequence[str] | None = None, online: bool | None = None) -> list[str]:
    """Expand a user task list into lm-eval task names (order kept, duplicates dropped).

    "offline"/"bundled" → the bundled subsets (spp_boolq, spp_arc_easy, spp_arc_challenge,
    spp_openbookqa, spp_copa); "paper" → the paper's seven tasks; "default" → "paper" when the Hub is
    reachable, else "offline"; "none" → nothing; anything else is an lm-eval task name (e.g. "mmlu").
    Names that need the Hub raise a clear error when it is not reachable.
    """
    if spec is None:
        spec = ["offline"]
    if isinstance(spec, str):
        spec = [part for part in spec.replace(",", " ").split() if part]
    names: list[str] = []
    for item in spec:
        key = item.strip()
        if key.lower() == "none":
            continue
        if key.lower() == "default":
            online = hub_available() if online is None else online
            key = "paper" if online else "offline"
        expanded = TASK_SETS.get(key.lower(), (key,))
        names.extend(name for name in expanded if name not in names)
    remote = [name for name in names if not name.startswith("spp_")]
    if remote and not (hub_available() if online is None else online):
        raise ValueError(
            f"Tasks {remote} download their data from the Hugging Face Hub, which is not reachable "
            f"({'offline mode is set' if offline_mode() else 'no network'}). Use the bundled subsets "
            f"('offline' = {', '.join(OFFLINE_TASKS)}) or connect to the Hub."
        )
    return names


def task_manager(names: Iterable[str]):
    """An lm-eval TaskManager that knows the bundled `spp_*` tasks (and the built-in ones when needed)."""
    from lm_eval.tasks import TaskManager  # lm-eval is slow to import; only zero-shot scoring needs it

    needs_defaults = any(not name.startswith("spp_") for name in names)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_defaults)


def _task_metrics(results: dict, name: str, fewshot: int) -> dict:
    found = results["results"][name]
    metrics: dict[str, Any] = {}
    for key, value in found.items():
        metric, _, filt = key.partition(",")
        if filt in ("none", "") and metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            metrics[metric] = None if value in ("N/A", None) else float(value)
    samples = results.get("n-samples", {}).get(name, {})
    metrics["n"] = samples.get("effective", found.get("sample_len"))
    metrics["num_fewshot"] = fewshot
    return metrics


def _task_samples(results: dict, name: str) -> list[dict]:
    return [
        {"doc_id": s["doc_id"], "gold": int(s["target"]), "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
        for s in results.get("samples", {}).get(name, [])
    ]


def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    log_samples: bool = False,
) -> dict[str, dict]:
    """Accuracy of `model` (an in-memory model object) on lm-eval tasks: {task: {acc, acc_norm, ..., n}}.

    `tasks` goes through `resolve_tasks` (default: the bundled subsets). `num_fewshot=None` uses the
    paper's protocol (0 shots; 5 for mmlu); an int forces it for every task. `limit` caps the
    questions per task. With `log_samples`, each task also gets `samples`: per question the gold index
    and the log-likelihood of every choice. The model is scored where it is; note that lm-eval seeds
    Python's, NumPy's and torch's global random generators.
    """
    import lm_eval  # slow to import; only zero-shot scoring needs it
    from lm_eval.models.huggingface import HFLM

    names = resolve_tasks(tasks)
    if not names:
        return {}
    groups: dict[int, list[str]] = {}
    for name in names:
        shots = num_fewshot if num_fewshot is not None else DEFAULT_FEWSHOT.get(name, 0)
        groups.setdefault(shots, []).append(name)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(names)
    found: dict[str, dict] = {}
    was_training = model.training
    try:
        for shots, group in groups.items():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=group, num_fewshot=shots, limit=limit, task_manager=manager,
                log_samples=log_samples, bootstrap_iters=1000,
            )  # fmt: skip
            for name in group:
                found[name] = _task_metrics(results, name, shots)
                if log_samples:
                    found[name]["samples"] = _task_samples(results, name)
    finally:
        model.train(was_training)
    return {name: found[name] for name in names}


# --------------------------------------------------------------------------- the evaluation record
def _describe(model: torch.nn.Module) -> dict:
    report = sparsity_report(model)
    spp_layers = getattr(model, "spp_layers", None)
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsity": report.ratio,
        "sparsity_pattern": report.pattern,
        "spp_unmerged": bool(spp_layers is not None and any(True for _ in spp_layers())),
    }


@dataclass
class EvalPlan:
    """What `evaluation_record` measures; `spp-hf eval` and the pipeline's eval stage each fill one."""

    wikitext2: bool = True  # WikiText-2 raw test perplexity
    seqlen: int | None = None  # perplexity window (None: the model's context, at most 2048)
    windows: int | None = None  # WikiText-2 windows (None: all)
    source: str = "auto"  # where WikiText-2 comes from: auto, hub or bundled
    heldout: Sequence[str] = ()  # bundled corpora (`spp_hf.data.corpora`) scored like WikiText-2
    heldout_windows: int | None = None
    tasks: Sequence[str] = ()  # lm-eval task names, already resolved (`resolve_tasks`)
    limit: int | float | None = None  # questions per task (None: all)
    num_fewshot: int | None = None  # None: the paper's protocol (`DEFAULT_FEWSHOT`)
    ppl_batch_size: int = 1
    tasks_batch_size: int | str = 1


def evaluation_record(model: torch.nn.Module, tokenizer: Any, plan: EvalPlan, info: dict[str, Any]) -> EvalRecord:
    """Measure `model` as `plan` says, in the one record schema (`spp_hf.pipeline.results.EvalRecord`).

    `info` names the model (its "model" key: a path, repo id or class name) and how it was loaded; the
    model's class, size and sparsity and the spp-hf version are added.
    """
    started = time.time()
    about = {k: v for k, v in info.items() if k != "model"} | _describe(model) | {"spp_hf_version": __version__}
    record = EvalRecord(str(info["model"]), about)
    if plan.wikitext2:
        found = perplexity_result(model, tokenizer, seqlen=plan.seqlen, max_windows=plan.windows,
                                  batch_size=plan.ppl_batch_size, source=plan.source)  # fmt: skip
        record.perplexity[WIKITEXT2] = asdict(found)
    for name in plan.heldout:
        found = corpus_perplexity(model, tokenizer, name, plan.seqlen, plan.heldout_windows, plan.ppl_batch_size)
        record.perplexity[name] = asdict(found)
    if plan.tasks:
        record.zero_shot = zero_shot(model, tokenizer, list(plan.tasks), limit=plan.limit, num_fewshot=plan.num_fewshot,
                                     batch_size=plan.tasks_batch_size)  # fmt: skip
        record.zero_shot_limit = plan.limit
    record.seconds = round(time.time() - started, 1)
    return record
