"""Issue 14 (items 3-7): devices/precision/threads, progress + TensorBoard + interrupts, the user-loop
Pruner and the HF Trainer callback, output-folder rules and messages."""
from __future__ import annotations

import copy
import io
import os
import signal
import stat
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit import Pruner
from prunekit.core.errors import DataError, RecipeError
from prunekit.core.plan import prune
from prunekit.io.checkpoint import signals_deferred
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import ResumeError, _resumable_loader, run_device, run_pipeline
from prunekit.pipelines.workloads import build_workload
from prunekit.training.config import Runtime, TrainConfig
from prunekit.training.device import Amp, resolve_device, to_device
from prunekit.training.loop import fit, seed_everything
from prunekit.training.progress import PlainProgress, TensorBoardLogger
from prunekit.training.tasks import ClassificationTask

os.environ["PRUNEKIT_NO_PROGRESS"] = "1"
NO_CUDA = not torch.cuda.is_available()
BASE = {"name": "uhw", "seed": 0, "device": "cpu", "model": {"name": "lenet5_classic"},
        "data": {"name": "mnist", "batch_size": 32, "eval_batch_size": 500, "limit": 128},
        "prune": {"structure": "unstructured", "sparsity": 0.8},
        "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 1, "scheduler": "none"},
        "dense": {"epochs": 0}}


def _recipe(**over):
    raw = copy.deepcopy(BASE)
    for k, v in over.items():
        raw[k] = v
    return parse_recipe(raw)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]


# -------------------------------------------------------------------------------- devices, precision
def test_device_resolution_and_batches():
    assert resolve_device("auto").type == ("cuda" if not NO_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RecipeError, match="not one of"):
        resolve_device("tpu")
    batch = {"a": torch.ones(2), "b": (torch.zeros(1), [torch.ones(1)]), "n": 3}
    moved = to_device(batch, "cpu")
    assert moved["a"] is batch["a"] and isinstance(moved["b"], tuple) and moved["n"] == 3
    with pytest.raises(RecipeError, match="fp16 needs a GPU"):
        Amp("fp16", "cpu")
    with pytest.raises(RecipeError, match="device"):
        parse_recipe({**BASE, "device": "gpu0"})


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cuda_recipe_without_cuda_fails_before_any_work(tmp_path):
    with pytest.raises(RecipeError, match="CUDA is not available"):
        run_pipeline(_recipe(device="cuda"), tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_threads_key_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        run_device(_recipe(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_autocast_training_keeps_hard_prune_exact():
    model, batches = _tiny()
    masks = prune(model, "unstructured", 0.7)
    seen = []
    orig = model[0].forward
    model[0].forward = lambda x: seen.append(torch.is_autocast_enabled("cpu")) or orig(x)
    fit(model, ClassificationTask(), batches, None, TrainConfig(epochs=2, lr=0.1), masks=masks,
        runtime=Runtime(precision="bf16"))
    assert seen and all(seen)                       # the forward ran under CPU bf16 autocast
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.all(p[~masks[name]] == 0)  # exactly zero
            assert (p == 0).float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert masks.sparsity() == pytest.approx(0.7, abs=0.01)


# -------------------------------------------------------------------------------- progress, tb, signals
def test_plain_progress_prints_at_the_interval():
    t = [0.0]
    buf = io.StringIO()
    pb = PlainProgress(100, desc="retrain", every_s=30, stream=buf, clock=lambda: t[0])
    for _ in range(100):
        t[0] += 1.0                       # 1 step/s
        pb.update(1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4                # at 30, 60, 90 s and the last step
    assert "step 30/100 (30.0%)" in lines[0] and "1.00 it/s" in lines[0] and "ETA 1m10s" in lines[0]
    pb2 = PlainProgress(10, every_s=0, every_steps=5, stream=io.StringIO())
    for _ in range(10):
        pb2.update(1)
    assert pb2.lines == 2


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    model, batches = _tiny()
    tb = TensorBoardLogger(tmp_path / "tb")
    fit(model, ClassificationTask(), batches, batches[:1], TrainConfig(epochs=1), hooks=[tb],
        masks=prune(model, "unstructured", 0.5), desc="retrain")
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"retrain/loss", "retrain/lr", "retrain/sparsity", "retrain/eval/accuracy"} <= tags
    assert len(acc.Scalars("retrain/loss")) == len(batches)
    assert acc.Scalars("retrain/sparsity")[0].value == pytest.approx(50.0, abs=0.5)


def test_signal_waits_for_the_checkpoint_and_resume_command_is_printed(tmp_path, capsys):
    from prunekit.cli import run as cli_run
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("checkpoint written")      # not interrupted mid-write
    assert done
    args = types.SimpleNamespace(recipe="r.yaml", overrides=["train.lr=0.1"], device="cpu", precision=None,
                                 threads=None, checkpoint_every=None, nproc=1)
    rc = cli_run._interruptible(args, tmp_path / "o", lambda: os.kill(os.getpid(), signal.SIGTERM))
    err = capsys.readouterr().err            # no run state yet (a run stopped before its first checkpoint)
    assert rc == 143 and "SIGTERM before the first checkpoint; nothing to resume" in err and "--resume" not in err
    (tmp_path / "o" / "state").mkdir(parents=True)
    rc = cli_run._interruptible(args, tmp_path / "o", lambda: os.kill(os.getpid(), signal.SIGTERM))
    err = capsys.readouterr().err
    assert rc == 143 and "SIGTERM" in err
    assert f"prunekit run r.yaml --set train.lr=0.1 --out {tmp_path / 'o'} --device cpu --resume" in err


# -------------------------------------------------------------------------------- the user's loop
def _hand_loop(recipe, algorithm, params=None):
    """The same run as `prunekit run` (dense epochs 0), written by hand with Pruner."""
    seed_everything(recipe.seed)
    wl = build_workload(recipe)
    loader = _resumable_loader(wl.train_loader, recipe.seed)
    model, ce = wl.model, nn.functional.cross_entropy
    cfg = recipe.train
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    pruner = Pruner(model, recipe, opt, algorithm=algorithm, params=params, total_steps=len(loader),
                    steps_per_epoch=len(loader))

    def epoch(e):
        loader.batch_sampler.set_epoch(e)
        for x, y in loader:
            out = model(x)
            loss = pruner.loss(ce(out, y), (x, y), out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pruner.step()
        pruner.epoch_end()

    if pruner.algorithm.has_search:
        epoch(0)
    opt2 = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    masks = pruner.finalize(opt2)
    opt = opt2
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    epoch(0)
    snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    return masks, snaps


@pytest.mark.parametrize("algo,params", [("oneshot", {}), ("admm", {"rho": 0.01, "update_every": 2})])
def test_pruner_in_a_hand_written_loop_matches_prunekit_run(tmp_path, algo, params):
    from prunekit.io.checkpoint import load_checkpoint
    recipe = _recipe(algorithm={"name": algo, "params": params})
    res = run_pipeline(recipe, tmp_path / "run", log=lambda *_: None)
    model = build_workload(recipe).model
    _, ref_masks, _ = load_checkpoint(tmp_path / "run", model)
    masks, snaps = _hand_loop(_recipe(algorithm={"name": algo, "params": params}), None)
    assert set(masks) == set(ref_masks) and all(torch.equal(masks[n], ref_masks[n]) for n in masks)
    base, hist = res["metrics"]["after_hard_prune"]["accuracy"], res["history"]["retrain"]
    pick = 1 if hist and hist[0]["accuracy"] > base else 0       # the runner keeps the best (restore_best)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, snaps[pick][k], atol=1e-6, rtol=0), k
    assert masks.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_hf_trainer_callback_ends_at_target_sparsity(tmp_path):
    transformers = pytest.importorskip("transformers")
    from prunekit.adapters.hf_callback import PrunekitCallback
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (12,), generator=g), "labels": int(i % 2)} for i in range(64)]
    pruner = Pruner(model, {"structure": "unstructured", "sparsity": 0.6,
                            "targets": {"include": ["*encoder.layer.*"], "types": ["Linear"]}}, algorithm="gradual")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[PrunekitCallback(pruner)])
    trainer.train()
    masks = pruner.masks
    assert pruner.finalized and len(masks) == 12
    assert masks.sparsity() == pytest.approx(0.6, abs=1e-3)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n][~m.to(params[n].device)] == 0)


# -------------------------------------------------------------------------------- outputs and messages
def test_out_folder_rules_and_file_modes(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError):   # fails validation (a structure that does not fit): no folder left
        run_pipeline(_recipe(prune={"structure": "block:7x7", "sparsity": 0.5}), out, log=lambda *_: None)
    assert not out.exists()
    fast = {"epochs": 0}
    run_pipeline(_recipe(retrain=fast), out, log=lambda *_: None)
    for f in ("results.json", "model.safetensors", "manifest.json", "recipe.yaml"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~_umask(), f
    (out / "compact").mkdir()
    with pytest.raises(ResumeError, match="--overwrite"):
        run_pipeline(_recipe(retrain=fast), out, log=lambda *_: None)
    run_pipeline(_recipe(retrain=fast), out, log=lambda *_: None, overwrite=True)
    assert not (out / "compact").exists() and (out / "results.json").exists()


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_attach_without_optimizer_binds_every_optimizer_silently():
    """No warning any more: without an optimizer, every torch optimizer's steps re-mask
    (tests/test_masks_exact.py checks the weights)."""
    model, _ = _tiny()
    masks = prune(model, "unstructured", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp = masks.attach(model)
        assert hp.optimizer is None
        hp.detach()
        masks.attach(model, torch.optim.SGD(model.parameters(), lr=0.1)).detach()


def test_python_m_prunekit_version_and_help():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "prunekit", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip().startswith("prunekit 0.")
    from prunekit.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert p.description or p.format_help().count("\n") > 3, name
        for a in p._actions:
            assert a.help, f"{name} {a.option_strings or a.dest} has no help"


def test_glue_metrics_are_percentages_and_header_only_file_is_a_data_error(tmp_path):
    from prunekit.data.glue import read_glue_tsv
    from prunekit.data.metrics import glue_metrics
    m = glue_metrics("mrpc", torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1]))
    assert m["accuracy"] == pytest.approx(75.0) and m["f1"] == pytest.approx(80.0)
    f = tmp_path / "train.tsv"
    f.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="no examples"):
        read_glue_tsv("sst2", f)


# -------------------------------------------------------------------------------- GPU (benchmarks/gpu_check.py)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA device on this machine (run benchmarks/gpu_check.py on one)")
def test_gpu_fit_hard_prune_exact(precision):
    model, batches = _tiny()
    model.cuda()
    masks = prune(model, "unstructured", 0.7).to("cuda")
    fit(model, ClassificationTask(), batches, batches[:2], TrainConfig(epochs=2, lr=0.1, grad_clip=1.0), masks=masks,
        runtime=Runtime(precision=precision))
    for name, p in model.named_parameters():
        if name in masks:
            assert p.is_cuda and torch.all(p[~masks[name]] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA device on this machine (run benchmarks/gpu_check.py on one)")
@pytest.mark.parametrize("algo,params", [("admm", {"rho": 0.01, "update_every": 2}), ("slr", {}),
                                         ("group_lasso", {}), ("gradual", {})])
def test_gpu_pipeline_and_resume_across_devices(tmp_path, algo, params):
    recipe = _recipe(device="cuda", algorithm={"name": algo, "params": params}, checkpoint_every=2,
                     distill={"alpha": 0.5})
    res = run_pipeline(recipe, tmp_path / "gpu", log=lambda *_: None)
    assert res["machine"]["device"].startswith("cuda") and res["sparsity"] == pytest.approx(0.8, abs=1e-3)
    # a run state saved on the GPU (CPU tensors on disk) resumes on the CPU
    from prunekit.io.checkpoint import StateStore
    env = {**os.environ, "PRUNEKIT_TEST_KILL_AT_STEP": "6"}
    src = Path(__file__).resolve().parents[1] / "src"
    rf = tmp_path / "r.yaml"
    import yaml

    from prunekit.pipelines.recipe import to_dict
    rf.write_text(yaml.safe_dump(to_dict(recipe)))
    cmd = [sys.executable, "-m", "prunekit", "run", str(rf), "--out", str(tmp_path / "x")]
    subprocess.run(cmd, env={**env, "PYTHONPATH": str(src)}, capture_output=True)
    assert StateStore(tmp_path / "x" / "state").exists()
    env.pop("PRUNEKIT_TEST_KILL_AT_STEP")
    r = subprocess.run(cmd + ["--resume", "--device", "cpu"], env={**env, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
