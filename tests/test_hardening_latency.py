"""Hardening of latency-targeted pruning and the options beside it (issue 29, sections 5 to 7): a damaged latency
table is measured again, with one warning, and replaced; a cache path that is not a regular file is never waited on,
read or written; --latency-target prunes every model --ratio prunes, also timed by TorchScript; --round-to keeps
narrow groups whole and says so; options given without the one they apply to are refused; out-of-memory advice names
the option that sized the work."""

import contextlib
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import chipprune.pruning.latency as latency
from chipprune.files.fileio import sha256
from chipprune.files.modelfile import load_model
from chipprune.models import ARCHS, create_model, external
from chipprune.profile import count_macs
from chipprune.pruning.graph import prune_model, prune_to_latency
from chipprune.pruning.latency import Runner, Table, Timing, describe
from command import run
from refusals import assert_refused, error_line

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, not hang, where the code inside blocks for longer than `seconds` (an open of a FIFO with no writer)."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def synthetic_times(self, modules, sample):
    """Runner.times on a machine where a module takes 0.01 ms, plus 1e-4 ms per weight row and column pair of each conv
    and linear layer in it: exact, and the same on every machine; each module runs once, as a real Runner runs it."""
    timings = []
    for module in modules:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *sample))
        layers = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        ms = 0.01 + 1e-4 * sum(m.weight.shape[0] * m.weight.shape[1] for m in layers)
        timings.append(Timing(ms, ms, ms))
    return timings


@pytest.fixture
def machine(monkeypatch):
    """Latency measured on the synthetic machine."""
    monkeypatch.setattr(latency.Runner, "times", synthetic_times)


def warning_lines(err: str) -> list[str]:
    """The warnings of a command's stderr (progress bars' updates split off)."""
    return [part for line in err.splitlines() for part in line.split("\r") if "warning:" in part]


# ---- 5. the latency cache ----

GOOD = '"call": [0.01, 0.009, 0.02]'
KEY = ["conv", [3, 3], [1, 1], [1, 1], [1, 1], 1, [8, 8], 16, 8]


def entry(key: list) -> str:
    """A table entry of a valid timing under `key` (written as Table.save writes keys)."""
    return f"{json.dumps(json.dumps(key))}: [0.05, 0.04, 0.06]"


BAD_TABLES = {
    "nan": '{"call": [NaN, NaN, NaN]}',
    "nan-beside-good": "{" + GOOD + ', "x": 1, ' + entry(KEY).replace("[0.05, 0.04, 0.06]", "[NaN, 0.04, 0.06]") + "}",
    "infinity": '{"call": [Infinity, 1.0, Infinity]}',
    "overflow": '{"call": [1e999, 1.0, 1e999]}',
    "negative": '{"call": [-1.0, -2.0, 0.5]}',
    "zero": '{"call": [0, 0, 0]}',
    "median-outside": '{"call": [5.0, 1.0, 2.0]}',
    "strings": '{"call": ["0.01", "0.01", "0.01"]}',
    "a-string": '{"call": "fast"}',
    "booleans": '{"call": [true, true, true]}',
    "two-numbers": '{"call": [0.01, 0.01]}',
    "nested": '{"call": [[0.01], [0.01], [0.01]]}',
    "bare-list": "[[0.01, 0.009, 0.02]]",
    "top-string": '"a table"',
    "null": "null",
    "number": "1",
    "unknown-key": '{"bogus": [0.01, 0.009, 0.02]}',
    "no-outputs": "{" + GOOD + ", " + entry([*KEY[:-1], 0]) + "}",
    "unknown-kind": "{" + GOOD + ", " + entry(["deconv", *KEY[1:]]) + "}",
    "float-channels": "{" + GOOD + ", " + entry([*KEY[:-2], 16.0, 8]) + "}",
    "boolean-groups": "{" + GOOD + ", " + entry([*KEY[:5], True, *KEY[6:]]) + "}",
    "short-key": "{" + GOOD + ", " + entry(KEY[:-1]) + "}",
    "spaced-key": '{"[\\"conv\\",[3,3],[1,1],[1,1],[1,1],1,[8,8],16,8]": [0.05, 0.04, 0.06]}',
    "deep": "[" * 100_000 + "]" * 100_000,
    "deep-value": '{"call": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "binary": "\x00\xff\xfe garbage",
    "empty": "",
    "truncated": "{" + GOOD + ", " + entry(KEY)[:20],
}


def table_path(folder: Path, runner: Runner) -> Path:
    """Where the table of `runner` is cached under `folder`."""
    return folder / "latency" / f"{runner.key}.json"


def read_back(folder: Path, runner: Runner) -> Table:
    """The cached table, which must load without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Table.cached(runner, folder)


@pytest.mark.parametrize("case", sorted([*BAD_TABLES, "over-the-limit"]))
def test_a_damaged_latency_table_is_measured_again_and_replaced(tmp_path, monkeypatch, case):
    runner = Runner("eager", threads=1, repeats=2, warmup=1)
    path = table_path(tmp_path, runner)
    path.parent.mkdir()
    if case == "over-the-limit":  # a valid table of 40 entries, larger than the limit (the table measured is not)
        monkeypatch.setattr(latency, "TABLE_LIMIT", 1000)
        path.write_text("{" + ", ".join([GOOD, *(entry([*KEY[:-1], n]) for n in range(1, 40))]) + "}")
    else:
        path.write_text(BAD_TABLES[case], encoding="latin-1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = Table.cached(runner, tmp_path)
    (message,) = [str(w.message) for w in caught]
    assert str(path) in message and message.endswith("; measuring it again") and "\n" not in message
    assert table.entries == {} and table.path == path
    layer = describe(nn.Conv2d(16, 8, 3, padding=1), (16, 8, 8))
    assert table.ms(layer, 16, 8) >= 0 and table.measured == 2
    table.save()
    again = read_back(tmp_path, runner)
    assert again.entries == table.entries and len(again.entries) == 2


@pytest.mark.parametrize("case", ["nan", "strings", "bare-list", "negative", "deep"])
def test_chip_prune_measures_a_damaged_table_again_and_prunes(capsys, workdir, tmp_path, cache, machine, case):
    runner = Runner("eager", threads=1)
    path = table_path(cache, runner)
    path.parent.mkdir(parents=True)
    path.write_text(BAD_TABLES[case])
    model = workdir / "r20.pt"
    before = sha256(model)
    args = ["prune", model, "--latency-target", "0.5", "--criterion", "l1", "--threads", "1", "--repeats", "1"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "p.pt", "--json")
    assert code == 0, err
    (line,) = warning_lines(err)
    assert line.startswith("chip prune: warning: latency table ") and str(path) in line
    assert line.endswith("; measuring it again")
    result = json.loads(out)
    assert result["flops"] < 0.6 * result["base_flops"], "not the unpruned model"
    assert result["latency"]["pruned_ms"] <= result["latency"]["target_ms"]
    assert sha256(model) == before
    assert len(read_back(cache, runner).entries) > 1  # replaced by the table measured


def non_regular(path: Path, kind: str, victim: Path) -> None:
    """Put at `path` what `kind` names: a FIFO, a folder, or a symbolic link (to `victim`, to a FIFO, to nothing)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "link-to-the-input-model":
        path.symlink_to(victim)
    elif kind == "link-to-a-fifo":
        os.mkfifo(path.with_name("fifo"))
        path.symlink_to(path.with_name("fifo"))
    elif kind == "link-to-a-folder":
        path.symlink_to(path.parent)
    else:
        assert kind == "dangling-link"
        path.symlink_to(path.with_name("nothing.json"))


def snapshot(path: Path) -> tuple:
    """What is at `path`, itself: its type and, for a link, where it points."""
    st = os.lstat(path)
    return st.st_mode, st.st_ino, os.readlink(path) if path.is_symlink() else None


@pytest.mark.parametrize(
    "kind", ["fifo", "folder", "link-to-the-input-model", "link-to-a-fifo", "link-to-a-folder", "dangling-link"]
)
def test_a_cache_path_that_is_not_a_regular_file_is_never_read_or_written(
    capsys, workdir, tmp_path, cache, machine, kind
):
    model = shutil.copy(workdir / "r20.pt", tmp_path / "m.pt")
    before = sha256(model)
    runner = Runner("eager", threads=1)
    path = table_path(cache, runner)
    path.parent.mkdir(parents=True)
    non_regular(path, kind, model)
    there = snapshot(path)
    args = ["prune", model, "--latency-target", "0.5", "--criterion", "l1", "--threads", "1", "--repeats", "1"]
    with deadline(60):
        code, out, err = run(capsys, *args, "--out", tmp_path / "p.pt")
    assert code == 0, err
    (line,) = warning_lines(err)
    assert line.startswith(f"chip prune: warning: {path} is ") and line.endswith(", not caching it")
    assert snapshot(path) == there and sha256(model) == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name] + ["fifo"] * (kind == "link-to-a-fifo"))
    assert load_model(tmp_path / "p.pt").model.widths != load_model(model).model.widths


# ---- 6. --latency-target on every model --ratio prunes; TorchScript; --round-to ----

LIBRARY = [
    "torchvision:shufflenet_v2_x0_5",  # channel-shuffled stages: one group spans the outputs of 8 convs
    "timm:mixnet_s",  # split convs: one group spans the parts of a conv
    "timm:rexnet_100",  # partial residuals: a group spans a concatenation
    "torchvision:squeezenet1_1",  # concatenated expand convs
    "timm:ghostnet_050",  # concatenated ghost features
    "torchvision:mobilenet_v3_small",
]


@pytest.mark.parametrize("name", LIBRARY)
def test_latency_target_prunes_the_models_ratio_prunes(name, machine):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = external.build(external.parse(name, {"num_classes": 10})).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_ratio = prune_model(model, x, [], pruning_ratio=0.9, criterion="l1")  # most of every group removed
        pruned, report = prune_to_latency(model, x, [], 0.5, Runner(), criterion="l1")
        with pytest.raises(ValueError, match="ask for") as refused:  # 0.001 is out of reach, and said to be
            prune_to_latency(model, x, [], 0.001, Runner(), criterion="l1")
        fastest = float(re.search(r"ask for ([\d.]+)", str(refused.value)).group(1))
        least, _ = prune_to_latency(model, x, [], fastest, Runner(), criterion="l1")  # all every group can give
    for small in (by_ratio, pruned, least):
        assert count_macs(small, x) < count_macs(model, x)
        with torch.no_grad():
            assert small(x).shape == (1, 10)
    assert report.pruned.median_ms <= report.target_ms


def test_a_latency_target_below_the_floor_is_one_line_naming_the_fastest_and_writes_nothing(
    capsys, workdir, tmp_path, machine
):
    out = tmp_path / "l.pt"
    args = ["--data", workdir / "data", "--batches", "1", "--batch-size", "8", "--out", out, "--json"]
    code, stdout, err = run(capsys, "prune", workdir / "r20.pt", "--latency-target", "0.01", *args)
    assert code == 2 and stdout == "" and not out.exists()
    line = err.strip().splitlines()[-1]
    assert re.search(r"chip prune: error: latency target 0\.01: .* measured 0\.\d+ x .* ask for 0\.\d\d or more$", line)
    fastest = re.search(r"ask for (0\.\d\d)", line).group(1)
    code, stdout, err = run(capsys, "prune", workdir / "r20.pt", "--latency-target", fastest, *args)
    assert code == 0, err
    assert json.loads(stdout)["latency"]["pruned_ms"] <= json.loads(stdout)["latency"]["target_ms"]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("resnet") and a != "resnet50"])
def test_torchscript_times_a_graph_pruned_cifar_resnet(arch):
    torch.manual_seed(0)
    model, x = create_model(arch).eval(), torch.randn(1, 3, 32, 32)
    pruned = prune_model(model, x, [], pruning_ratio=0.3, criterion="l1")
    timing = Runner("torchscript", threads=1, repeats=1, warmup=1).time(pruned, (3, 32, 32))
    assert 0 < timing.median_ms < float("inf")


class Twice(nn.Module):
    """One tensor held under two names (TorchScript's tracer refuses that)."""

    def __init__(self, shared: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        if shared == "buffer":
            index = torch.arange(4)
            self.register_buffer("a", index)
            self.register_buffer("b", index)
        else:
            self.register_parameter("a", self.conv.weight)  # also held by the conv: another module, which is allowed
            self.b = self.a

    def forward(self, x):
        y = self.conv(x)
        return y.index_select(1, self.a) + y.index_select(1, self.b) if self.a.dim() == 1 else y * self.b.sum()


@pytest.mark.parametrize("shared", ["buffer", "parameter"])
def test_torchscript_times_modules_holding_a_tensor_twice(shared):
    module = Twice(shared).eval()
    timing = Runner("torchscript", threads=1, repeats=2, warmup=1).time(module, (3, 4, 4))
    assert 0 < timing.min_ms <= timing.median_ms <= timing.max_ms
    assert module.a is (module.b if shared == "buffer" else module.conv.weight), "the module timed is left as it was"


def widths(model: nn.Module) -> dict[str, int]:
    """Each conv's output channels."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


R20_GROUPS = [16] * 4 + [32] * 4 + [64] * 4  # each stage's residual group and its blocks' inner groups


@pytest.mark.parametrize("round_to", [3, 8, 24, 32, 128])
@pytest.mark.parametrize(
    "budget",
    [{"pruning_ratio": 0.5}, {"pruning_ratio": 0.8}, {"flops_target": 0.8}, {"pruning_ratio": 0.5, "scope": "global"}],
    ids=lambda b: "-".join(map(str, b.values())),
)
def test_round_to_keeps_multiples_and_leaves_narrower_groups_whole(round_to, budget):
    torch.manual_seed(0)
    model, x = create_model("resnet20").eval(), torch.randn(1, 3, 32, 32)
    full = widths(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pruned = prune_model(model, x, [], criterion="l1", round_to=round_to, **budget)
        except ValueError as e:  # rounding up can keep more than the FLOPs target: said in one line
            assert "flops_target" in budget and "the prunable groups keep at least" in str(e)
            return
    kept = widths(pruned)
    assert all(kept[n] % round_to == 0 or kept[n] == full[n] for n in full), kept
    assert all(kept[n] >= min(round_to, full[n]) for n in full), kept
    narrow = [str(w.message) for w in caught if f"round_to {round_to}: groups of fewer units" in str(w.message)]
    count = sum(width < round_to for width in R20_GROUPS)
    assert len(narrow) == (count > 0), caught
    if count > 4:
        assert narrow[0].endswith(f", ... ({count} groups)")
    elif count:
        assert narrow[0].count(", ") == count - 1 and "layer1.0.conv1" in narrow[0]


def test_chip_prune_round_to_says_which_groups_it_left_whole_and_records_it(capsys, workdir, tmp_path):
    args = ["prune", workdir / "r20.pt", "--ratio", "0.5", "--round-to", "32", "--criterion", "l1"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "p.pt", "--json")
    assert code == 0, err
    (line,) = warning_lines(err)
    assert line.startswith("chip prune: warning: round_to 32: groups of fewer units keep them all: conv1, ")
    assert json.loads(out)["round_to"] == 32
    mf = load_model(tmp_path / "p.pt")
    assert mf.meta["pruned"]["round_to"] == 32
    assert set(widths(mf.model).values()) <= {16, 32, 64}, "16: stage 1, narrower than 32, whole"


# ---- 7. options without the option they apply to; out-of-memory advice ----

LATENCY_ONLY = [
    ["--runtime", "eager"],
    ["--runtime", "onnxruntime"],
    ["--threads", "1"],
    ["--latency-batch-size", "4"],
    ["--latency-batch-size", "1"],
    ["--repeats", "3"],
    ["--runtime", "torchscript", "--threads", "2", "--repeats", "5"],
]
BUDGETS = [["--ratio", "0.3"], ["--flops-target", "0.5"], ["--sparsity", "[0.]*3"]]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: b[0])
@pytest.mark.parametrize("given", LATENCY_ONLY, ids=" ".join)
def test_latency_options_without_latency_target_are_refused(capsys, workdir, tmp_path, budget, given):
    result = run(capsys, "prune", workdir / "r20.pt", *budget, *given, "--out", tmp_path / "p.pt")
    names = [g for g in given if g.startswith("--")]
    assert_refused(result, " and ".join(names), "to --latency-target")
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize(
    "given", [["--batch-sizes", "1"], ["--threads", "2"], ["--repeats", "5"], ["--device", "cpu"]], ids=" ".join
)
@pytest.mark.parametrize("source", ["file", "arch"])
def test_timing_options_of_profile_without_latency_are_refused(capsys, workdir, given, source):
    model = [workdir / "r20.pt"] if source == "file" else ["--arch", "resnet20"]
    assert_refused(run(capsys, "profile", *model, *given), f"{given[0]} applies to --latency")


def out_of_memory(*args, **kwargs):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")


def oom_above_batch_1(self, modules, sample):
    """Runner.times that runs out of memory above batch 1."""
    return out_of_memory() if self.batch_size > 1 else synthetic_times(self, modules, sample)


OOM_CASES = {  # command, what runs out of memory, the advice
    "prune-latency-batch": (
        ["prune", "{m}", "--latency-target", "0.5", "--criterion", "l1", "--latency-batch-size", "8", "--out", "{o}"],
        ("chipprune.pruning.latency.Runner.times", oom_above_batch_1),
        ": try a smaller --latency-batch-size",
    ),
    "prune-latency-batch-1": (
        ["prune", "{m}", "--latency-target", "0.5", "--criterion", "l1", "--out", "{o}"],
        ("chipprune.pruning.latency.Runner.times", out_of_memory),
        "",
    ),
    "profile-batch-sizes": (
        ["profile", "{m}", "--latency", "--batch-sizes", "1,16", "--repeats", "1"],
        ("chipprune.pruning.latency.Runner.times", oom_above_batch_1),
        ": try a smaller --batch-sizes",
    ),
    "eval": (
        ["eval", "{m}", "--data", "{d}"],
        ("chipprune.api.evaluate_batches", out_of_memory),
        ": try a smaller --batch-size",
    ),
    "export": (
        ["export", "{m}", "--format", "torchscript", "--out", "{o}"],
        ("chipprune.api.export_checked", out_of_memory),
        ": try a smaller --batch-size",
    ),
    "import": (
        ["import", "--arch", "resnet20", "--weights", "{m}", "--out", "{o}"],
        ("chipprune.api.import_weights", out_of_memory),
        "",
    ),
}


@pytest.mark.parametrize("case", sorted(OOM_CASES))
def test_out_of_memory_advice_names_the_option_that_sized_the_work(capsys, workdir, tmp_path, monkeypatch, case):
    args, (target, raiser), advice = OOM_CASES[case]
    monkeypatch.setattr(target, raiser)
    paths = {"{m}": str(workdir / "r20.pt"), "{d}": str(workdir / "data"), "{o}": str(tmp_path / "out")}
    code, out, err = run(capsys, *[paths.get(a, a) for a in args])
    assert code == 2 and out == ""
    assert error_line(err) == f"chip {args[0]}: error: out of memory: 1 GB asked for at once{advice}"
    assert not (tmp_path / "out").exists()
