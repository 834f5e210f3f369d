"""Pruning: the sparsity schedule, exact magnitude masks that survive training and resume, and channel
pruning of every registry model (valid against the unpruned model, loadable in a fresh process)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compress import structured
from pipeline.compress.structured import channel_widths, prune_structured
from pipeline.models.files import resize_to_state_dict
from pipeline.compress.unstructured import (
    MagnitudePruner,
    is_update_step,
    phase_bounds,
    target_sparsity,
    update_steps,
    weight_sparsity,
)
from pipeline.models import build_model, convert_norm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the machine is shared, and the models here are tiny."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resnet20(shortcut: str = "A") -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", 10, shortcut=shortcut)


def batches(n: int, batch: int = 4, channels_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch,), generator=g)))
    return out


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def test_constant_schedule_values_and_update_steps():
    kw = dict(schedule="constant", final=0.8, begin=0.1, end=0.6)
    # t0 = round(0.1 * 100) = 10: nothing before, the final sparsity from t0 on (end plays no part)
    assert [target_sparsity(t, 100, **kw) for t in (0, 9, 10, 11, 60, 99)] == [0, 0, 0.8, 0.8, 0.8, 0.8]
    # re-applied every `frequency` steps from t0 until the last step, past `end`
    assert update_steps(100, schedule="constant", frequency=20, begin=0.1, end=0.6) == [10, 30, 50, 70, 90]
    assert update_steps(5, schedule="constant", frequency=1) == [0, 1, 2, 3, 4]


def test_polynomial_schedule_values_and_update_steps():
    kw = dict(schedule="polynomial", final=0.8, initial=0.1, begin=0.1, end=0.6, power=3.0)
    assert phase_bounds(100, begin=0.1, end=0.6) == (10, 60)
    expected = {
        0: 0.0,
        9: 0.0,  # before t0
        10: 0.1,  # t0: the initial sparsity
        20: 0.8 - 0.7 * 0.8**3,  # 0.4416
        35: 0.8 - 0.7 * 0.5**3,  # half way: 0.7125
        59: 0.8 - 0.7 * (1 / 50) ** 3,
        60: 0.8,
        61: 0.8,
        99: 0.8,  # t1 and after
    }
    for t, s in expected.items():
        assert target_sparsity(t, 100, **kw) == pytest.approx(s, abs=1e-12), t
    assert target_sparsity(35, 100, **{**kw, "power": 1.0}) == pytest.approx(0.45)
    # updates at t0 + k * frequency while <= t1, and always at t1 itself
    for freq, steps in ((20, [10, 30, 50, 60]), (25, [10, 35, 60]), (100, [10, 60]), (1, list(range(10, 61)))):
        assert update_steps(100, schedule="polynomial", frequency=freq, begin=0.1, end=0.6) == steps, freq
    assert is_update_step(60, 100, schedule="polynomial", frequency=20, begin=0.1, end=0.6)
    assert not is_update_step(70, 100, schedule="polynomial", frequency=20, begin=0.1, end=0.6)
    assert not is_update_step(100, 100, schedule="polynomial", frequency=20, begin=0.1, end=0.6)


def test_schedule_edges():
    # end=1 would put t1 at step T, which never runs: it is clamped to the last step T - 1
    assert phase_bounds(10, begin=0.0, end=1.0) == (0, 9)
    assert update_steps(10, schedule="polynomial", frequency=4) == [0, 4, 8, 9]
    assert target_sparsity(9, 10, schedule="polynomial", final=0.5) == 0.5
    assert target_sparsity(8, 10, schedule="polynomial", final=0.5) == pytest.approx(0.5 - 0.5 / 9**3)
    # begin == end: one jump to the final sparsity at t0
    assert update_steps(100, schedule="polynomial", frequency=7, begin=0.5, end=0.5) == [50]
    assert [target_sparsity(t, 100, schedule="polynomial", final=0.3, begin=0.5, end=0.5) for t in (49, 50, 51)] == [
        0.0,
        0.3,
        0.3,
    ]
    # Python's round(): halves to even
    assert phase_bounds(10, begin=0.25, end=0.75) == (2, 8)
    # no pruning steps at all (one-shot): no update step, the target is the final sparsity
    assert update_steps(0, schedule="polynomial", frequency=1) == []
    assert target_sparsity(0, 0, schedule="polynomial", final=0.6) == 0.6
    with pytest.raises(ValueError, match="schedule"):
        target_sparsity(0, 10, schedule="cubic", final=0.5)
    with pytest.raises(ValueError, match="begin"):
        phase_bounds(10, begin=0.8, end=0.2)


# --------------------------------------------------------------------------------------------------
# Exact masks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_sparsity_and_dense_first_last(scope):
    model = resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = MagnitudePruner(model, scope=scope, final=0.7, total_steps=0)
    assert "conv1" not in pruner.names and "fc" not in pruner.names and len(pruner.names) == 18
    assert pruner.prune_to(0.7) == 0.7

    weights = {n: model.get_submodule(n).weight for n in pruner.names}
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    if scope == "layer":
        for n, w in weights.items():
            assert zeros[n] == round(0.7 * w.numel()), n
    else:
        assert sum(zeros.values()) == round(0.7 * total)
        assert len({round(zeros[n] / weights[n].numel(), 3) for n in weights}) > 1  # not the same per layer
    # magnitude criterion: every pruned weight was no larger than every kept one (per tensor / overall)
    groups = [[n] for n in weights] if scope == "layer" else [list(weights)]
    for names in groups:
        orig = torch.cat([before[f"{n}.weight"].abs().reshape(-1) for n in names])
        keep = torch.cat([pruner.masks[n].reshape(-1) for n in names])
        assert orig[~keep].max() <= orig[keep].min()
    # the first conv and the classifier are untouched
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    assert torch.equal(model.fc.weight, before["fc.weight"])

    report = pruner.report()
    assert report["target"] == 0.7 and report["total"] == total
    assert report["zeros"] == sum(zeros.values())
    assert abs(report["sparsity"] - 0.7) <= len(weights) / total
    assert set(report["layers"]) == set(pruner.names)
    measured = weight_sparsity(model)
    assert measured["layers"]["conv1"] == 0.0 and measured["layers"]["fc"] == 0.0
    assert measured["zeros"] == report["zeros"] and measured["total"] > total


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ties_cannot_change_the_count(scope):
    model = resnet20()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.fill_(0.5)  # every magnitude ties
    pruner = MagnitudePruner(model, scope=scope, final=0.3, dense_first_last=False)
    assert "conv1" in pruner.names and "fc" in pruner.names
    pruner.prune_to(0.3)
    weights = [model.get_submodule(n).weight for n in pruner.names]
    if scope == "layer":
        assert all(int((w == 0).sum()) == round(0.3 * w.numel()) for w in weights)
    else:
        assert sum(int((w == 0).sum()) for w in weights) == round(0.3 * sum(w.numel() for w in weights))


# --------------------------------------------------------------------------------------------------
# Training with masks
# --------------------------------------------------------------------------------------------------


def train_steps(model, optimizer, pruner, data, start=0, check=True, amp_dtype=None):
    """Steps start.. of a training loop with pruner.step after each optimizer step; checks the masks."""
    model.train()
    previous = pruner.masks
    for t, (x, y) in enumerate(data, start=start):
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pruner.step(t)
        if not check:
            continue
        for name, keep in pruner.masks.items():
            w = pruner.model.get_submodule(name).weight
            pruned = w.detach()[~keep]
            assert torch.equal(pruned, torch.zeros_like(pruned)) and not torch.signbit(pruned).any(), (t, name)
            if name in previous:  # targets never fall: a pruned weight stays pruned
                assert not (keep & ~previous[name]).any(), (t, name)
        previous = pruner.masks


@pytest.mark.parametrize("opt", ["momentum", "nesterov", "adam"])
def test_zeros_stay_zero_while_training(opt):
    model = resnet20()
    params = model.parameters()
    if opt == "adam":
        optimizer = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=opt == "nesterov")
    pruner = MagnitudePruner(model, final=0.6, schedule="polynomial", end=0.75, frequency=2, total_steps=8)
    assert update_steps(8, schedule="polynomial", frequency=2, end=0.75) == [0, 2, 4, 6]
    start = model.layer2[0].conv1.weight.detach().clone()
    train_steps(model, optimizer, pruner, batches(8))
    report = pruner.report()
    assert report["target"] == 0.6 and report["zeros"] == round(0.6 * report["total"])
    kept = pruner.masks["layer2.0.conv1"]
    assert not torch.equal(model.layer2[0].conv1.weight[kept], start[kept])  # it did train


def test_channels_last_and_bf16_autocast_keep_format_and_zeros():
    model = resnet20("B").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pruner = MagnitudePruner(model, scope="layer", final=0.5, schedule="constant", frequency=2, total_steps=4)
    train_steps(model, optimizer, pruner, batches(2, batch=2, channels_last=True))
    train_steps(model, optimizer, pruner, batches(2, batch=2, channels_last=True), start=2, amp_dtype=torch.bfloat16)
    for name in pruner.names:
        w = model.get_submodule(name).weight
        assert w.dtype == torch.float32
        if w.dim() == 4 and w.shape[-1] > 1:
            assert w.is_contiguous(memory_format=torch.channels_last), name
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_autocast_with_grad_scaler():
    model = resnet20().cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda")
    pruner = MagnitudePruner(model, final=0.7, frequency=1, total_steps=4)
    for t, (x, y) in enumerate(batches(4, channels_last=True)):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x.cuda()), y.cuda())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pruner.step(t)
    report = pruner.report()
    assert report["zeros"] == round(0.7 * report["total"])
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in pruner.names)


def test_wrapped_models_are_unwrapped(tmp_path):
    import torch.distributed as dist

    model = resnet20()
    # torch.compile only wraps until the first call: the pruner must see the plain module's names
    compiled = MagnitudePruner(torch.compile(model), final=0.5)
    assert compiled.model is model and compiled.names[0] == "layer1.0.conv1"

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        pruner = MagnitudePruner(ddp, final=0.5, frequency=1, total_steps=2)
        assert pruner.names == compiled.names
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        train_steps(ddp, optimizer, pruner, batches(2, batch=2))
        assert pruner.report()["zeros"] == round(0.5 * pruner.report()["total"])
        assert all(not k.startswith("module.") for k in pruner.state_dict()["masks"])
    finally:
        dist.destroy_process_group()


def _plain(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return isinstance(obj, (torch.Tensor, bool, int, float, str))


def test_state_dict_round_trip_resumes_bitwise(tmp_path):
    data = batches(10)

    def make():
        model = resnet20()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        pruner = MagnitudePruner(model, final=0.7, initial=0.1, end=0.8, frequency=3, total_steps=10)
        return model, optimizer, pruner

    ref_model, ref_opt, ref_pruner = make()
    train_steps(ref_model, ref_opt, ref_pruner, data, check=False)

    model, optimizer, pruner = make()
    train_steps(model, optimizer, pruner, data[:5], check=False)
    state = pruner.state_dict()
    assert _plain(state) and state["updates"] == 2 and state["last_update_step"] == 3
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": state}, path)

    model2, optimizer2, pruner2 = make()
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    optimizer2.load_state_dict(ckpt["optimizer"])
    pruner2.load_state_dict(ckpt["pruner"])
    assert pruner2.masks.keys() == pruner.masks.keys()
    assert all(torch.equal(pruner2.masks[n], pruner.masks[n]) for n in pruner.masks)
    assert pruner2.target == pruner.target
    train_steps(model2, optimizer2, pruner2, data[5:], start=5, check=False)

    for (k, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(ref_pruner.masks[n], pruner2.masks[n]) for n in ref_pruner.masks)
    assert ref_pruner.report() == pruner2.report()

    other = MagnitudePruner(resnet20(), final=0.7, dense_first_last=False)
    with pytest.raises(ValueError, match="other layers"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Structured pruning of every registry model
# --------------------------------------------------------------------------------------------------

MODELS = [
    ("resnet20", "A"),
    ("resnet20", "B"),
    ("resnet32", "A"),
    ("resnet44", "A"),
    ("resnet56", "A"),
    ("resnet110", "A"),
    ("preact_resnet164", "A"),
    ("googlenet", "A"),
    ("resnet9", "A"),
]


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so the validity check sees every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


def zero_removed(model: nn.Module, removed: dict[str, dict[str, list[int]]]) -> None:
    """Zero, in the unpruned model, exactly what the pruner removed (outputs, norms, and inputs)."""
    with torch.no_grad():
        for name, kinds in removed.items():
            m = model.get_submodule(name)
            for kind, idx in kinds.items():
                idx = torch.tensor(idx)
                if isinstance(m, (nn.Conv2d, nn.Linear)) and kind == "in":
                    m.weight[:, idx] = 0
                else:
                    m.weight[idx] = 0
                    if m.bias is not None:
                        m.bias[idx] = 0


def prune_one(name: str, shortcut: str, **kw) -> SimpleNamespace:
    torch.manual_seed(0)
    model = build_model(name, 10, shortcut=shortcut).eval()
    randomize_norms(model)
    unpruned = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    report = prune_structured(model, example_input=x, record_removed=True, **{"ratio": 0.5, **kw})
    return SimpleNamespace(model=model, unpruned=unpruned, x=x, report=report)


@pytest.fixture(scope="module")
def pruned():
    """Each registry model pruned once at ratio 0.5, shared by the tests below."""
    cache: dict[tuple[str, str], SimpleNamespace] = {}

    def get(key: tuple[str, str]) -> SimpleNamespace:
        if key not in cache:
            cache[key] = prune_one(*key)
        return cache[key]

    return get


def assert_valid(case: SimpleNamespace) -> None:
    """Pruned outputs == unpruned outputs with the removed channels zeroed (eval mode)."""
    assert case.report["removed"]
    zero_removed(case.unpruned, case.report["removed"])
    case.model.eval()
    case.unpruned.eval()
    with torch.no_grad():
        got, want = case.model(case.x), case.unpruned(case.x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("key", MODELS, ids=lambda k: "-".join(k))
def test_structured_every_registry_model(pruned, key):
    case = pruned(key)
    r = case.report
    with torch.no_grad():
        assert case.model(case.x).shape == (2, 10)
    assert r["params_after"] < r["params_before"] and r["macs_after"] < r["macs_before"]
    assert r["params_after"] == sum(p.numel() for p in case.model.parameters())
    assert {n: w[1] for n, w in r["widths"].items()} == channel_widths(case.model)
    assert all(after % 8 == 0 and 0 < after <= before for before, after in r["widths"].values())
    assert case.model.fc.out_features == 10 and "fc" in r["ignored"]
    if key[0].startswith("resnet") and key != ("resnet9", "A") and key[1] == "A":
        # option A: the residual stream keeps its widths, only the blocks' inner convs shrink
        assert "conv1" in r["ignored"] and r["widths"]["conv1"] == [16, 16]
        assert r["widths"]["layer3.0.conv2"] == [64, 64] and r["widths"]["layer3.0.conv1"] == [64, 32]
    assert_valid(case)


def test_resnet20_b_real_widths_after_round_to(pruned):
    # 16-channel layers: 16 * 0.8 = 12.8 rounds down to 8, so ratio 0.2 already halves stage 1
    r = prune_one("resnet20", "B", ratio=0.2).report
    w = {n: after for n, (_, after) in r["widths"].items()}
    assert (w["conv1"], w["layer1.2.conv2"], w["layer2.0.conv1"], w["layer3.2.conv2"]) == (8, 8, 24, 48)
    assert w["layer2.0.shortcut.0"] == 24
    assert r["macs_after"] / r["macs_before"] < 0.5
    r = pruned(("resnet20", "B")).report
    w = {n: after for n, (_, after) in r["widths"].items()}
    assert (w["conv1"], w["layer2.0.conv2"], w["layer3.0.conv1"]) == (8, 16, 32)
    assert (r["params_before"], r["params_after"]) == (272474, 68786)


def test_iterative_l1_pruning_is_valid():
    case = prune_one("resnet20", "B", importance="l1", iterative_steps=3)
    assert case.report["iterative_steps"] == 3
    assert case.report["params_after"] < case.report["params_before"]
    assert_valid(case)  # removed indices of the later steps mapped back to the original numbering


def test_option_a_trap_gives_a_clear_error(monkeypatch):
    # Without the stem and the blocks' conv2 kept, torch-pruning 1.6.1 breaks option-A ResNets.
    monkeypatch.setattr(structured, "_shortcut_a_ignored", lambda model: [])
    with pytest.raises(RuntimeError, match="unable to run a forward pass"):
        prune_structured(resnet20("A"), ratio=0.5, example_input=torch.randn(2, 3, 32, 32))


def test_ratio_zero_and_groupnorm_warning():
    model = resnet20("B")
    r = prune_structured(model, ratio=0.0, example_input=torch.randn(2, 3, 32, 32))
    assert r["params_after"] == r["params_before"]
    # GroupNorm(16 groups): round_to applies per group and rounds every group away: nothing is removed
    gn = convert_norm(resnet20("B"), "group")
    with pytest.warns(UserWarning, match="removed no channel"):
        r = prune_structured(gn, ratio=0.5, example_input=torch.randn(2, 3, 32, 32))
    assert r["params_after"] == r["params_before"]


def test_resize_groupnorm_model_to_a_pruned_state_dict():
    model = convert_norm(resnet20("B"), "group")
    prune_structured(model, ratio=0.5, round_to=1, example_input=torch.randn(2, 3, 32, 32))
    fresh = resize_to_state_dict(convert_norm(build_model("resnet20", 10, shortcut="B"), "group"), model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert channel_widths(fresh) == channel_widths(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from pipeline.models.files import resize_to_state_dict
    from pipeline.models import build_model
    folder = sys.argv[1]
    for spec in sys.argv[2:]:
        name, shortcut = spec.rsplit("-", 1)
        sd = torch.load(f"{folder}/{spec}.pt", weights_only=True)
        io = torch.load(f"{folder}/{spec}.io.pt", weights_only=True)
        model = resize_to_state_dict(build_model(name, 10, shortcut=shortcut), sd)
        model.load_state_dict(sd)
        model.eval()
        with torch.no_grad():
            y = model(io["x"])
        ok = torch.allclose(y, io["y"], rtol=1e-5, atol=1e-6)
        print(spec, "ok" if ok else "MISMATCH", torch.equal(y, io["y"]), (y - io["y"]).abs().max().item())
""")


def test_pruned_state_dicts_load_in_a_fresh_process(pruned, tmp_path):
    specs = []
    for key in MODELS:
        case = pruned(key)
        spec = "-".join(key)
        case.model.eval()
        with torch.no_grad():
            y = case.model(case.x)
        torch.save(case.model.state_dict(), tmp_path / f"{spec}.pt")
        torch.save({"x": case.x, "y": y}, tmp_path / f"{spec}.io.pt")
        specs.append(spec)
    r = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path), *specs],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    for spec in specs:
        line = next((ln for ln in lines if ln.startswith(spec + " ")), None)
        assert line is not None and line.split()[1] == "ok", (spec, r.stdout)
