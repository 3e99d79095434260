"""Latency-targeted pruning: the layer table and its cache, the choice on a synthetic latency model, a real run."""

import json
import re
import warnings

import pytest
import torch
from torch import nn

import chipprune.pruning.latency as latency
from chipprune.profile import count_macs
from chipprune.pruning.allocation import Curve
from chipprune.pruning.graph import prune_model, prune_to_latency
from chipprune.pruning.latency import Layer, Runner, Table, describe
from command import run


def synthetic_ms(inputs: int, outputs: int) -> float:
    """A machine that likes multiples of 8: in × out × 0.001 ms, and 1 ms more for any other output count."""
    return inputs * outputs * 0.001 + (0.0 if outputs % 8 == 0 else 1.0)


class Synthetic(Table):
    """A table of synthetic_ms."""

    def ms(self, layer: Layer, inputs: int, outputs: int) -> float:
        self.measured += 1
        return synthetic_ms(inputs, outputs)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def test_the_table_measures_each_shape_once_and_caches_it_by_runtime_threads_batch_and_machine(tmp_path, monkeypatch):
    runner = Runner("eager", batch_size=2, threads=1, repeats=2, warmup=1)
    table = Table.cached(runner, tmp_path)
    layer = describe(nn.Conv2d(16, 16, 3, padding=1), (16, 8, 8))
    assert layer == Layer("conv", (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    first = table.ms(layer, 16, 8)
    assert table.ms(layer, 16, 8) == first and table.measured == 2  # the layer, and the cost of a call
    table.ms(layer, 8, 8)
    table.save()
    assert table.path.parent == tmp_path / "latency"
    assert re.fullmatch(r"eager-cpu-t1-b2-[0-9a-f]{8}\.json", table.path.name)
    again = Table.cached(runner, tmp_path)
    assert again.ms(layer, 16, 8) == first and again.measured == 0
    assert len(json.loads(table.path.read_text())) == 3
    other = Table.cached(Runner("eager", batch_size=4, threads=1), tmp_path)
    assert other.entries == {}  # another batch size: another table
    monkeypatch.setattr(latency, "_processor", lambda device: "another processor")
    assert Table.cached(runner, tmp_path).entries == {}  # another machine: another table
    assert describe(nn.Conv2d(8, 8, 3, groups=8), (8, 4, 4)).kind == "depthwise"


def machine(rest_ms: float, factor: float):
    """A Runner.times of synthetic models: their layers' synthetic_ms times `factor`, plus `rest_ms`."""

    def times(self, modules, sample):
        timings = []
        for module in modules:
            layers = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
            ms = rest_ms + factor * sum(synthetic_ms(m.weight.shape[1], m.weight.shape[0]) for m in layers)
            timings.append(latency.Timing(ms, ms, ms))
        return timings

    return times


def test_the_choice_stops_at_the_target_on_counts_the_machine_likes(monkeypatch):

    monkeypatch.setattr(latency.Table, "cached", classmethod(lambda cls, runner, folder=None: Synthetic(runner, None)))
    monkeypatch.setattr(latency.Runner, "times", machine(0.0, 1.25))  # the rest shrinks with the layers
    model, x = net(), torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the linear head's group is scored on 2-D maps: a warning says so
        pruned, report = prune_to_latency(model, x[:1], [x], 0.5, Runner())
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths  # never a count the machine runs slowly
    assert report.pruned.median_ms <= report.target_ms == 0.5 * report.dense.median_ms
    assert report.predicted_ms == pytest.approx(report.pruned.median_ms)  # an exact model
    assert report.rounds < latency.ROUNDS  # it stopped when a choice came back
    assert report.pruned.median_ms > 0.4 * report.dense.median_ms  # it stopped once the target was met


def test_a_missed_prediction_is_corrected_and_measured_again(monkeypatch):
    monkeypatch.setattr(latency.Table, "cached", classmethod(lambda cls, runner, folder=None: Synthetic(runner, None)))
    monkeypatch.setattr(latency.Runner, "times", machine(4.0, 1.0))  # a rest that does not shrink: a slower model
    model, x = net(), torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_to_latency(model, x[:1], [x], 0.6, Runner())
    assert report.rounds > 1 and report.predicted_ms < report.pruned.median_ms  # the first choice missed
    assert report.pruned.median_ms <= report.target_ms  # the corrected one, measured, meets the target


def test_timings_side_by_side_alternate_in_blocks():
    calls = []

    class Tagged(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    timings = Runner("eager", repeats=2 * latency.BLOCK, warmup=1).times([Tagged("a"), Tagged("b")], (1,))
    assert len(timings) == 2 and all(t.min_ms <= t.median_ms <= t.max_ms for t in timings)
    runs = [tag for i, tag in enumerate(calls) if i == 0 or calls[i - 1] != tag]
    assert runs == ["a", "b", "a", "b"] and len(calls) == 2 * 2 * (latency.BLOCK + 1)


def test_a_real_run_on_the_cpu_prunes_and_reports(tmp_path, one_thread):
    model, x = net(), torch.randn(4, 3, 16, 16)
    runner = Runner("eager", threads=1, repeats=5, warmup=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a noisy machine may miss the target by a little: it says so
        pruned, report = prune_to_latency(model, x[:1], [x], 0.6, runner, cache=str(tmp_path))
    assert count_macs(pruned, x[:1]) < count_macs(model, x[:1])
    assert pruned(x).shape == (4, 10)
    assert report.target_ms == pytest.approx(0.6 * report.dense.median_ms)
    assert 1 <= report.rounds <= latency.ROUNDS and report.measured_layers > 0
    assert (tmp_path / "latency" / f"{runner.key}.json").exists()
    again = prune_model(model, x[:1], [x], latency_target=0.6, runtime=runner)
    assert again(x).shape == (4, 10)


def test_chip_prune_latency_target_on_a_registry_model(capsys, workdir, tmp_path, one_thread):
    code, out, err = run(capsys, "prune", workdir / "r20.pt", "--latency-target", "0.7", "--data", workdir / "data",
                         "--batches", "1", "--batch-size", "8", "--repeats", "5", "--threads", "1",
                         "--out", tmp_path / "l.pt", "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["latency_target"] == 0.7 and r["runtime"] == "eager" and r["flops"] < r["base_flops"]
    t = r["latency"]
    assert t["target_ms"] == pytest.approx(0.7 * t["dense_ms"]) and t["threads"] == 1 and t["batch_size"] == 1
    code, _, err = run(capsys, "prune", workdir / "r20.pt", "--latency-target", "0.7", "--round-to", "8",
                       "--out", tmp_path / "x.pt")  # fmt: skip
    assert code == 2 and "do not apply to --latency-target" in err


def test_chip_prune_allocates_a_latency_target_by_sensitivity_and_reuses_the_curves(
    capsys, workdir, tmp_path, one_thread
):
    base = ["prune", workdir / "r20.pt", "--data", workdir / "data", "--batches", "1", "--batch-size", "8"]
    code, out, err = run(capsys, *base, "--latency-target", "0.7", "--allocate", "sensitivity", "--repeats", "5",
                         "--threads", "1", "--out", tmp_path / "l.pt", "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["allocate"] == "sensitivity" and r["latency"]["pruned_ms"] <= r["latency"]["target_ms"]
    assert "on the 32 calibration images after the scored ones, not 1280" in err  # the fixture's 40, less 8 scored
    assert "sensitivity" in err and "point" in err  # the curves' progress bar
    code, out, err = run(capsys, *base, "--flops-target", "0.5", "--allocate", "sensitivity", "--out",
                         tmp_path / "f.pt", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["allocate"] == "sensitivity"
    assert "point" not in err  # the same curves, read from the cache: nothing measured, no bar
    for given, message in (
        (["--allocate", "global"], "do not apply to --latency-target"),
        (["--allocate", "sensitivity", "--criterion", "l1"], "allocating by sensitivity needs --data"),
    ):
        code, _, err = run(capsys, "prune", workdir / "r20.pt", "--latency-target", "0.7", *given, "--out",
                           tmp_path / "x.pt")  # fmt: skip
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("stale", [False, True])
def test_a_cached_table_whose_entries_no_longer_agree_with_each_other_is_measured_again(tmp_path, monkeypatch, stale):
    monkeypatch.setattr(latency.Runner, "times", machine(0.01, 1.0))  # every layer timed as synthetic_ms
    model, x = net(), torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_to_latency(model, x[:1], [x], 0.5, Runner(), cache=str(tmp_path))
    path = next((tmp_path / "latency").iterdir())
    today = json.loads(path.read_text())

    # Uniformly 3x slower (a load that slowed everything alike), or the 32-channel outputs 5x and the rest as today (a
    # load that came and went while the table was measured): the dense model's first conv is one of them.
    def factor(key: str) -> float:
        return (5.0 if key != "call" and json.loads(key)[-1] == 32 else 1.0) if stale else 3.0

    planted = {k: [t * factor(k) for t in v] for k, v in today.items()}
    path.write_text(json.dumps(planted))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_to_latency(model, x[:1], [x], 0.5, Runner(), cache=str(tmp_path))
    said = [str(w.message) for w in caught if "measuring it again" in str(w.message)]
    kept = json.loads(path.read_text())
    if stale:
        assert len(said) == 1 and str(path) in said[0] and "their cached times" in said[0], said
        assert all(kept[k] == today[k] for k in kept if k in today)  # measured again: today's times, not the planted
    else:
        assert said == [] and all(kept[k] == planted[k] for k in planted)  # one multiple of today's: kept as cached


def test_the_next_aim_is_where_a_line_through_the_checks_meets_the_ratio():
    def check(predicted: float, ratio: float) -> latency.Trial:  # against a dense model of 10 ms
        return latency.Trial(ratio, None, None, 10 * predicted, None)

    assert latency.next_aim([check(0.5, 0.6)], 10, 0.48) == pytest.approx(10 * 0.5 * 0.48 / 0.6)  # one: proportion
    line = [check(0.3, 0.41), check(0.5, 0.6), check(0.4, 0.49)]  # noisy about ratio = 0.1 + predicted
    assert latency.next_aim(line, 10, 0.45) == pytest.approx(10 * (0.45 - 0.1), abs=0.2)
    falling = [check(0.3, 0.6), check(0.5, 0.4)]  # noise can make a line fall: then the last check's proportion
    assert latency.next_aim(falling, 10, 0.45) == pytest.approx(10 * 0.5 * 0.45 / 0.4)
    slow = [check(0.5, 0.9), check(0.45, 0.85)]  # all above: at most halved per check, however steep the line
    assert latency.next_aim(slow, 10, 0.45) == pytest.approx(10 * 0.45 / 2)


def test_every_group_keeps_its_floor_and_a_target_below_it_is_refused_naming_the_fastest(monkeypatch):
    monkeypatch.setattr(latency.Table, "cached", classmethod(lambda cls, runner, folder=None: Synthetic(runner, None)))
    monkeypatch.setattr(latency.Runner, "times", machine(0.0, 1.0))
    model, x = net(), torch.randn(4, 3, 8, 8)
    dense = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_to_latency(model, x[:1], [x], 0.3, Runner())
        kept = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
        assert all(k >= latency.FLOOR * d for k, d in zip(kept, dense, strict=True)), kept
        assert report.pruned.median_ms <= report.target_ms
        with pytest.raises(ValueError, match=r"measured 0\.\d+ x .* ask for 0\.\d\d or more") as refused:
            prune_to_latency(model, x[:1], [x], 0.1, Runner())
    fastest = float(re.search(r"ask for (0\.\d\d)", str(refused.value)).group(1))
    assert 0.1 < fastest <= report.pruned.median_ms / report.dense.median_ms + 0.01  # the floor: the fastest there is


def noisy(seed: int, spread: float):
    """machine(0, 1) with each timing off by up to `spread` (a fraction), the noise seeded."""
    exact, rng = machine(0.0, 1.0), __import__("random").Random(seed)

    def times(self, modules, sample):
        return [
            latency.Timing(*(t.median_ms * (1 + rng.uniform(-spread, spread)),) * 3)
            for t in exact(self, modules, sample)
        ]

    return times


def linear_curves(steep: str) -> dict[str, Curve]:
    """Curves for net()'s groups (by root: its convs "0", "3" and "6"), each losing damage in proportion to the
    units removed, the group `steep` 100x faster than the others."""
    units = {"0": 32, "3": 64, "6": 64}
    return {
        root: Curve((n, 3 * n // 4, n // 2, n // 4), tuple((100.0 if root == steep else 1.0) * d for d in (0, 1, 2, 3)))
        for root, n in units.items()
    }


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_a_sensitivity_allocation_spends_the_latency_where_it_hurts_least(monkeypatch, target):
    monkeypatch.setattr(latency.Table, "cached", classmethod(lambda cls, runner, folder=None: Synthetic(runner, None)))
    monkeypatch.setattr(latency.Runner, "times", machine(0.0, 1.0))
    model, x = net(), torch.randn(4, 3, 8, 8)
    curves = linear_curves(steep="3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uniform, by_uniform = prune_to_latency(model, x[:1], [x], target, Runner())
        allocated, by_curves = prune_to_latency(model, x[:1], [x], target, Runner(), curves=curves)
    widths = dict(zip("036", conv_widths(allocated), strict=True))
    damage = [sum(curves[r].at(w) for r, w in zip("036", conv_widths(m), strict=True)) for m in (uniform, allocated)]
    assert widths["3"] > conv_widths(uniform)[1]  # the sensitive group keeps more than one fraction for all leaves it
    assert widths["3"] == 64 or target < 0.5  # and at half the time, all of it
    assert damage[1] < damage[0]
    assert all(widths[r] >= latency.FLOOR * n for r, n in (("0", 32), ("6", 64)))
    for report in (by_uniform, by_curves):
        assert latency.BAND * report.target_ms <= report.pruned.median_ms <= report.target_ms


def test_curves_of_another_model_are_refused(monkeypatch):
    monkeypatch.setattr(latency.Table, "cached", classmethod(lambda cls, runner, folder=None: Synthetic(runner, None)))
    monkeypatch.setattr(latency.Runner, "times", machine(0.0, 1.0))
    model, x = net(), torch.randn(4, 3, 8, 8)
    wrong = {**linear_curves(steep="3"), "3": Curve((48, 24), (0.0, 1.0))}
    with warnings.catch_warnings(), pytest.raises(ValueError, match="a curve of 48 units, not 64 .* another model"):
        warnings.simplefilter("ignore")
        prune_to_latency(model, x[:1], [x], 0.5, Runner(), curves=wrong)


@pytest.mark.parametrize("target", [0.5, 0.2])
@pytest.mark.parametrize("allocate", ["uniform", "sensitivity"])
def test_the_same_search_on_a_noisy_machine_lands_in_the_band_every_time(monkeypatch, target, allocate):
    monkeypatch.setattr(latency.Table, "cached", classmethod(lambda cls, runner, folder=None: Synthetic(runner, None)))
    model, x = net(), torch.randn(4, 3, 8, 8)
    true_ms = machine(0.0, 1.0)
    curves = linear_curves(steep="3") if allocate == "sensitivity" else None
    ratios = []
    for seed in range(4):
        monkeypatch.setattr(latency.Runner, "times", noisy(seed, 0.05))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, _ = prune_to_latency(model, x[:1], [x], target, Runner(), curves=curves)
        dense_ms, pruned_ms = (t.median_ms for t in true_ms(None, [model, pruned], None))
        ratios.append(pruned_ms / dense_ms)
    assert all(0.85 * target <= r <= 1.06 * target for r in ratios), ratios
