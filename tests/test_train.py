"""Training: configuration, data order, logs, checkpoints, exact resuming, safe loading, DDP."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from companion.data.augment import WormCropDataset, collate_crops
from companion.data.synthetic import make_dataset
from companion.model.dropout import concrete_layers
from companion.training.batches import _IterationSampler
from companion.training.checkpoint import load_model, read_checkpoint
from companion.training.config import PRESETS, TrainConfig
from companion.training.run_folder import TERM_NAMES, read_log
from companion.training.step import build_model, make_optimizer, train_step
from companion.training.train import train

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def tiny_config(**overrides) -> TrainConfig:
    """The quick preset, shortened further for tests."""
    base = dict(
        iterations=4, checkpoint_every=2, log_every=2, crop_size=32, base_filters=2, embedding_dim=4, depth=3
    )
    return TrainConfig.preset("quick", **{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_data():
    return make_dataset(3, seed=0, shape=(64, 64))


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_json(name):
    config = TrainConfig.preset(name)
    restored = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert config.crop_size % 16 == 0


def test_paper_preset_has_the_papers_settings():
    config = TrainConfig.preset("paper")
    assert (config.crop_size, config.embedding_dim, config.base_filters, config.depth) == (512, 16, 19, 5)
    assert (config.iterations, config.delta_d, config.length_scale_sq, config.zeta) == (
        800_000,
        4.0,
        1e-6,
        1e-3,
    )
    assert config.weight_decay == 1e-6 and config.model == "concrete"


def test_presets_are_ordered_by_cost():
    cost = {
        n: TrainConfig.preset(n).iterations
        * TrainConfig.preset(n).crop_size ** 2
        * TrainConfig.preset(n).batch_size
        for n in PRESETS
    }
    assert cost["quick"] < cost["cpu"] < cost["colab"] < cost["paper"]


def test_preset_overrides_and_errors():
    assert TrainConfig.preset("cpu", model="baseline", seed=7).model_kwargs()["dropout"] is None
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        TrainConfig.preset("gpu")
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(crop_size=100)
    with pytest.raises(ValueError, match="model must be"):
        TrainConfig(model="bayesian")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['colour'\]"):
        TrainConfig.from_dict({"colour": 1})


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------
def test_data_order_is_a_function_of_the_iteration():
    full = list(_IterationSampler(0, 10, batch_size=3))
    resumed = list(_IterationSampler(4, 10, batch_size=3))
    assert resumed == full[4 * 3 :]


def test_ranks_read_disjoint_shards_whose_union_is_the_single_process_batch():
    world, batch = 3, 2
    shards = [list(_IterationSampler(0, 5, batch, rank=r, world_size=world)) for r in range(world)]
    single = list(_IterationSampler(0, 5, batch * world))
    for it in range(5):
        per_rank = [s[it * batch : (it + 1) * batch] for s in shards]
        union = sorted(i for part in per_rank for i in part)
        assert union == single[it * batch * world : (it + 1) * batch * world]


def test_numpy_blas_runs_single_threaded_inside_the_training_loop():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from companion.training.batches import single_threaded_numpy_blas

    def openblas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]

    if not openblas_threads():
        pytest.skip("NumPy is not linked against OpenBLAS here")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = openblas_threads()
        assert set(before) == {2}
        with single_threaded_numpy_blas():
            assert openblas_threads() == [1] * len(before)
        assert openblas_threads() == before


# --------------------------------------------------------------------------------------------
# one run: log, checkpoints, loading
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(tiny_config().seed)
    initial = build_model(tiny_config()).state_dict()
    final = train(tiny_config(), tiny_data, out, progress=False)
    return out, final, initial


def test_train_writes_a_log_record_of_every_term_and_dropout_rate(finished_run):
    out, final, _ = finished_run
    records = read_log(out)
    assert [r["iteration"] for r in records] == [2, 4]
    n_layers = len(concrete_layers(load_model(final)))
    assert n_layers > 0
    for r in records:
        assert set(TERM_NAMES) <= set(r)
        assert len(r["dropout_rates"]) == n_layers and all(0 < p < 1 for p in r["dropout_rates"])
        # window means are linear, so the logged total is still the sum of the logged terms
        assert r["total"] == pytest.approx(
            r["var"] + r["dist"] + 1e-3 * r["reg"] + r["ce"] + r["model_reg"], rel=1e-5
        )


def test_final_checkpoint_is_safe_and_holds_everything_needed_to_resume(finished_run):
    out, final, initial = finished_run
    ckpt = torch.load(final, map_location="cpu", weights_only=True)  # primitives and tensors only
    assert ckpt["iteration"] == 4 and TrainConfig.from_dict(ckpt["config"]) == tiny_config()
    assert {"model", "optimizer", "scaler", "rng", "data_position", "package_version"} <= set(ckpt)
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["data_position"]["next_crop_index"] == 4 * tiny_config().batch_size
    model = load_model(final)
    assert not model.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "training did not change any weight"
    assert torch.equal(
        read_checkpoint(out / "last.pt")["model"]["class_head.layer.weight"],
        ckpt["model"]["class_head.layer.weight"],
    )


def test_train_refuses_to_overwrite_a_run_without_resume(finished_run, tiny_data):
    out, _, _ = finished_run
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_config(), tiny_data, out, progress=False)


def test_resume_with_another_architecture_is_refused(finished_run, tiny_data):
    out, _, _ = finished_run
    with pytest.raises(ValueError, match="architecture"):
        train(tiny_config(base_filters=3, iterations=6), tiny_data, out, resume=True, progress=False)


def test_train_step_lowers_the_loss_on_a_fixed_batch(tiny_data):
    config = tiny_config(model="baseline", lr=1e-2)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ds = WormCropDataset(tiny_data, crop_size=32, length=2, seed=0)
    batch = collate_crops([ds[0], ds[1]])
    losses = [float(train_step(model, optimizer, batch, n_train=3, config=config).total) for _ in range(15)]
    assert losses[-1] < losses[0]


def test_disc_warmup_trains_the_class_head_but_not_the_embedding_head(tmp_path, tiny_data):
    # baseline without weight decay: during the warm-up only the cross-entropy moves weights
    config = tiny_config(model="baseline", weight_decay=0.0, disc_warmup=4)
    torch.manual_seed(config.seed)
    initial = build_model(config).state_dict()
    trained = load_model(train(config, tiny_data, tmp_path / "warm", progress=False)).state_dict()
    embedding_head = [k for k in initial if k.startswith("embedding_head") and k.endswith("weight")]
    class_head = [k for k in initial if k.startswith("class_head") and k.endswith("weight")]
    assert embedding_head and class_head
    for key in embedding_head:
        assert torch.equal(initial[key], trained[key]), key
    assert any(not torch.equal(initial[k], trained[k]) for k in class_head)
    # ...whereas without the warm-up the same run moves the embedding head too
    no_warmup = TrainConfig.from_dict({**config.to_dict(), "disc_warmup": 0})
    plain = load_model(train(no_warmup, tiny_data, tmp_path / "plain", progress=False)).state_dict()
    assert any(not torch.equal(initial[k], plain[k]) for k in embedding_head)
    with pytest.raises(ValueError, match="disc_warmup"):
        tiny_config(disc_warmup=-1)


def test_resume_drops_log_records_written_after_the_checkpoint(tmp_path, tiny_data):
    config = tiny_config(log_every=1)

    def stop(iteration, path):
        if iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_data, tmp_path, progress=False, on_checkpoint=stop)
    with open(tmp_path / "log.jsonl", "a") as f:  # written after the checkpoint, then killed
        f.write(json.dumps({"iteration": 3, "total": -1.0}) + "\n")
    train(config, tiny_data, tmp_path, resume=True, progress=False)
    records = read_log(tmp_path)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert records[2]["total"] != -1.0


# --------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------
class _Exploit:
    """Pickles to a call that creates a file when (unsafely) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_model_never_executes_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "companion-checkpoint", "payload": _Exploit(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt is not a companion checkpoint"):
        load_model(evil)
    assert not marker.exists()
    # the file really is an exploit: a plain pickle load would have run it
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    with open(tmp_path / "plain.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_load_model_rejects_other_files_with_a_clear_error(finished_run, tmp_path):
    _, final, _ = finished_run
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(junk)
    bare = tmp_path / "bare.pt"
    torch.save(load_model(final).state_dict(), bare)
    with pytest.raises(ValueError, match="bare.pt is not a companion training checkpoint"):
        load_model(bare)
    other = tmp_path / "other.pt"
    ckpt = torch.load(final, weights_only=True)
    ckpt["model_kwargs"] = {**ckpt["model_kwargs"], "base_filters": 3}
    torch.save(ckpt, other)
    with pytest.raises(ValueError, match="other.pt: its weights do not fit the architecture"):
        load_model(other)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------
# exact resuming after a real kill
# --------------------------------------------------------------------------------------------
RUN_SCRIPT = textwrap.dedent("""
    import os, sys
    from companion.training.config import TrainConfig
    from companion.data.synthetic import make_dataset
    from companion.training.train import train

    out, resume, kill_at = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
    config = TrainConfig.preset("quick", iterations=6, checkpoint_every=2, log_every=1,
                                crop_size=32, base_filters=2, embedding_dim=4, depth=3,
                                num_workers=1)

    def die_after(iteration, path):
        if iteration == kill_at:
            os._exit(17)  # no clean-up, no flushing: as if the machine went away

    train(config, make_dataset(3, seed=0, shape=(64, 64)), out, resume=resume, progress=False,
          on_checkpoint=die_after)
""")


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    whole, broken = tmp_path / "whole", tmp_path / "broken"

    done = _run(script, whole, "fresh", -1)
    assert done.returncode == 0, done.stderr
    killed = _run(script, broken, "fresh", 2)
    assert killed.returncode == 17, killed.stderr
    assert read_checkpoint(broken / "last.pt")["iteration"] == 2
    assert not (broken / "final.pt").exists()
    resumed = _run(script, broken, "resume", -1)
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(whole / "final.pt", weights_only=True)
    b = torch.load(broken / "final.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    def strip(recs):
        return [{k: v for k, v in r.items() if k not in ("time", "it_per_s")} for r in recs]

    assert strip(read_log(whole)) == strip(read_log(broken))
    assert [r["iteration"] for r in read_log(broken)] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------------------------
# DistributedDataParallel with 2 gloo processes on the CPU
# --------------------------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent("""
    import faulthandler, os, sys
    faulthandler.dump_traceback_later(int(os.environ.get("DDP_TEST_TIMEOUT", "100")), exit=True)
    import torch
    import torch.distributed as dist
    from companion.data.augment import WormCropDataset, collate_crops
    from companion.training.config import TrainConfig
    from companion.data.synthetic import make_dataset
    from companion.training.train import train
    from companion.training.step import build_model, train_step

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    data = make_dataset(3, seed=0, shape=(64, 64))
    config = TrainConfig.preset("quick", model="baseline", iterations=3, checkpoint_every=3,
                                log_every=1, crop_size=32, base_filters=2, embedding_dim=4,
                                depth=3, batch_size=1)
    # 1. the real entry point: train() joins the group from torchrun's environment variables
    train(config, data, out + "/ddp_run", progress=False)

    # 2. explicit steps, to compare the ranks' parameters and the loss with one process
    #    (a fresh rendezvous port: a fast rank must not meet the first group's closing store)
    os.environ["MASTER_PORT"] = os.environ["SECOND_MASTER_PORT"]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(config))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ds = WormCropDataset(data, crop_size=32, length=4, seed=0)
    losses = []
    for step in range(2):
        batch = collate_crops([ds[2 * step + rank]])
        terms = train_step(model, optimizer, batch, n_train=3, config=config)
        total = terms.total.clone()
        dist.all_reduce(total)
        losses.append(float(total) / 2)
    torch.save({"params": model.module.state_dict(), "losses": losses}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_two_gloo_processes_agree_with_each_other_and_with_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    first, second = _free_ports(2)
    env = {
        **SUBPROCESS_ENV,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(first),
        "SECOND_MASTER_PORT": str(second),
        "WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err

    # the two ranks hold identical parameters
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key

    # ... equal to one process stepping on the combined batch
    config = TrainConfig.preset(
        "quick", model="baseline", crop_size=32, base_filters=2, embedding_dim=4, depth=3, batch_size=2
    )
    data = make_dataset(3, seed=0, shape=(64, 64))
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ds = WormCropDataset(data, crop_size=32, length=4, seed=0)
    for step in range(2):
        batch = collate_crops([ds[2 * step], ds[2 * step + 1]])
        terms = train_step(model, optimizer, batch, n_train=3, config=config)
        assert float(terms.total) == pytest.approx(r0["losses"][step], rel=1e-6)
    # Adam divides each gradient by its running RMS, so the float32 rounding of averaging two
    # half-batch gradients (DDP) instead of one batch moves an lr = 1e-3 step by up to ~1e-6
    # relative to the step: parameters agree to a few 1e-6 (loss values to 1e-6 relative).
    for key, value in model.state_dict().items():
        torch.testing.assert_close(r0["params"][key], value, atol=1e-5, rtol=0)

    # train() under DDP: only rank 0 wrote the run, and it matches one process on the
    # combined batch (rank r reads crops (t * 2 + r), one process with batch 2 reads both)
    run = tmp_path / "ddp_run"
    assert [r["iteration"] for r in read_log(run)] == [1, 2, 3]
    single = train(
        TrainConfig.from_dict({**read_checkpoint(run / "final.pt")["config"], "batch_size": 2}),
        data,
        tmp_path / "single_run",
        progress=False,
    )
    for a, b in zip(read_log(run), read_log(single.parent)):
        assert a["total"] == pytest.approx(b["total"], rel=1e-6)
    ddp_model, one_model = load_model(run / "final.pt"), load_model(single)
    for (key, a), b in zip(ddp_model.state_dict().items(), one_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=key)  # see above


def test_mixed_precision_is_off_on_the_cpu():
    from companion.training.step import autocast_dtype

    assert autocast_dtype(TrainConfig.preset("quick"), torch.device("cpu")) is None


def test_init_from_starts_a_concrete_model_from_baseline_weights(tmp_path):
    from companion.training.checkpoint import init_weights
    from companion.training.step import build_model

    data = make_dataset(2, seed=0, shape=(96, 96))
    base_cfg = TrainConfig.preset("quick", model="baseline", iterations=2, checkpoint_every=2, log_every=1)
    base = train(base_cfg, data, tmp_path / "base", progress=False)
    cfg = TrainConfig.preset(
        "quick", model="concrete", iterations=2, checkpoint_every=2, log_every=1, init_from=str(base)
    )
    model = build_model(cfg)
    init_weights(model, base)
    baseline_state = load_model(base).state_dict()
    for key, value in model.state_dict().items():
        if key.endswith("p_logit"):  # the dropout rates start at their initial value
            assert torch.sigmoid(value).item() == pytest.approx(cfg.init_dropout_rate, rel=1e-5)
        else:
            assert torch.equal(value, baseline_state[key]), key
    # and the run trains from there, recording where it started
    final = train(cfg, data, tmp_path / "fine", progress=False)
    assert read_checkpoint(final)["config"]["init_from"] == str(base)
    # a checkpoint of another architecture is refused, naming the file
    other = TrainConfig.preset("quick", model="concrete", base_filters=6)
    with pytest.raises(ValueError, match="do not fit this network"):
        init_weights(build_model(other), base)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(iterations=50, lr=2.0, lr_schedule="cosine", lr_warmup=5)
    rates = [cfg.lr_at(t) for t in range(50)]
    assert rates[0] == pytest.approx(0.4) and rates[4] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))
    assert rates[-1] < 0.01 and TrainConfig(lr=0.3).lr_at(10**6) == 0.3


def test_standardize_stores_training_statistics_in_the_checkpoint(tmp_path):
    from companion.data.synthetic import make_dataset
    from companion.training.config import channel_statistics

    data = make_dataset(2, seed=0, shape=(96, 96))
    cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1, standardize=True)
    model = load_model(train(cfg, data, tmp_path, progress=False))
    mean, std = channel_statistics(data)
    assert model.input_mean.flatten().tolist() == pytest.approx(mean)
    assert model.input_std.flatten().tolist() == pytest.approx(std)
    assert std[0] == pytest.approx(float(np.concatenate([s.image[0].ravel() for s in data]).std()), rel=1e-4)


def test_downsample_travels_in_the_checkpoint_and_checks_the_crop(tmp_path):
    from companion.data.synthetic import make_dataset

    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig.preset("quick", downsample=2, crop_size=48)
    assert "downsample" not in TrainConfig.preset("quick").model_kwargs()  # old checkpoints unchanged
    data = make_dataset(2, seed=0, shape=(96, 96))
    cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1, downsample=2)
    model = load_model(train(cfg, data, tmp_path, progress=False))
    assert model.downsample == 2 and model.divisor == 32


def test_a_changed_weight_is_caught_by_the_recorded_digest(tmp_path):
    from companion.data.synthetic import make_dataset

    cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1)
    final = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False)
    ckpt = torch.load(final, weights_only=True)
    assert len(read_checkpoint(final)["model_sha256"]) == 64
    name = next(iter(ckpt["model"]))
    flat = ckpt["model"][name].view(-1).view(torch.int32)
    flat[0] ^= 1  # one flipped bit
    torch.save(ckpt, tmp_path / "flipped.pt")
    with pytest.raises(ValueError, match="flipped.pt is corrupted"):
        read_checkpoint(tmp_path / "flipped.pt")
    del ckpt["model_sha256"]  # a checkpoint from before the digest still loads
    torch.save(ckpt, tmp_path / "old.pt")
    assert read_checkpoint(tmp_path / "old.pt")["iteration"] == 2


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(tmp_path):
    from companion.data.synthetic import make_dataset

    # an absurd learning rate without clipping blows the weights up within a few steps
    cfg = TrainConfig.preset("quick", iterations=30, checkpoint_every=1, log_every=1, lr=1e12, grad_clip=0.0)
    with pytest.raises(FloatingPointError, match=r"keeps the last finite checkpoint") as err:
        train(cfg, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False)
    found = re.search(r"the (loss of|weights after) iteration (\d+)", str(err.value))
    failed = int(found.group(2))  # its loss or the weights after it were not finite
    kept = read_checkpoint(tmp_path / "last.pt")
    assert 1 < failed <= 30 and kept["iteration"] == failed - 1 and not (tmp_path / "final.pt").exists()
    assert all(torch.isfinite(t).all() for t in kept["model"].values())
    assert "lr 1e+12" in str(err.value)


def test_the_loss_is_checked_when_logged_yet_the_first_non_finite_iteration_is_named(tmp_path, monkeypatch):
    import companion.training.train as train_module
    from companion.data.synthetic import make_dataset
    from companion.training.losses import ObjectiveTerms

    real_step, calls = train_module.train_step, []

    def step_poisoned_at_7(*args, **kwargs):  # the loss of iteration 7 (and later) is NaN
        terms = real_step(*args, **kwargs)
        calls.append(1)
        return terms if len(calls) < 7 else ObjectiveTerms(terms.total * float("nan"), *terms[1:])

    monkeypatch.setattr(train_module, "train_step", step_poisoned_at_7)
    cfg = TrainConfig.preset("quick", iterations=30, checkpoint_every=5, log_every=5)
    with pytest.raises(FloatingPointError, match=r"the loss of iteration 7 is nan"):
        train(cfg, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False)
    assert len(calls) == 10  # read at the log of iteration 10, not after every step
    assert read_checkpoint(tmp_path / "last.pt")["iteration"] == 5  # the last finite checkpoint
    assert [r["iteration"] for r in read_log(tmp_path)] == [5]  # no record of a poisoned window


def test_cpu_bf16_turns_on_autocast_on_the_cpu(tmp_path):
    from companion.training.step import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype(TrainConfig.preset("quick"), cpu) is None
    assert autocast_dtype(TrainConfig.preset("quick", cpu_bf16=True), cpu) is torch.bfloat16
    data = make_dataset(2, seed=0, shape=(64, 64))
    config = TrainConfig.preset("quick", iterations=4, cpu_bf16=True, checkpoint_every=2)
    final = train(config, data, tmp_path / "run", progress=False)
    ckpt = read_checkpoint(final)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert ckpt["config"]["cpu_bf16"] is True


# --------------------------------------------------------------------------------------------
# one run per folder: the lock, earlier runs' files, an interrupted checkpoint write
# --------------------------------------------------------------------------------------------
HOLD_LOCK_SCRIPT = textwrap.dedent("""
    import sys
    from companion.training.run_folder import lock_run_folder

    with lock_run_folder(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold it until the test closes stdin or kills this process
""")


def test_a_second_training_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, tiny_data):
    from companion.training.run_folder import RunFolderBusyError

    script, out = tmp_path / "hold.py", tmp_path / "run"
    script.write_text(HOLD_LOCK_SCRIPT)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=SUBPROCESS_ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.communicate(timeout=60)[1]
        expected = rf"{re.escape(str(out))} is in use by another training process \(pid {holder.pid} "
        with pytest.raises(RunFolderBusyError, match=expected):
            train(tiny_config(), tiny_data, out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, nothing removed
    finally:
        holder.kill()  # like a crash: the operating system drops the lock
        holder.wait(timeout=60)
    assert read_checkpoint(train(tiny_config(), tiny_data, out, progress=False))["iteration"] == 4


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path, tiny_data):
    from companion.training.run_folder import lock_run_folder

    out = tmp_path / "run"
    train(tiny_config(), tiny_data, out, progress=False)
    with pytest.raises(ValueError, match="architecture"):  # fails inside the locked section
        train(tiny_config(base_filters=3, iterations=6), tiny_data, out, resume=True, progress=False)
    with lock_run_folder(out) as lock:  # free again: this process takes it
        assert lock.read_text().split()[0] == str(os.getpid())


def test_a_fresh_run_refuses_an_earlier_log_unless_told_to_overwrite(tmp_path, tiny_data):
    out = tmp_path / "run"
    out.mkdir()
    earlier = json.dumps({"iteration": 7, "total": 1.5}) + "\n"
    (out / "log.jsonl").write_text(earlier)
    with pytest.raises(FileExistsError, match=r"log\.jsonl.*no last\.pt.*overwrite=True"):
        train(tiny_config(), tiny_data, out, progress=False)
    assert (out / "log.jsonl").read_text() == earlier  # nothing lost
    with pytest.raises(ValueError, match="not both"):
        train(tiny_config(), tiny_data, out, resume=True, overwrite=True, progress=False)
    with pytest.warns(UserWarning, match=r"overwrite: removed the earlier run's log\.jsonl"):
        train(tiny_config(), tiny_data, out, overwrite=True, progress=False)
    assert [r["iteration"] for r in read_log(out)] == [2, 4]
    # a finished run (last.pt, final.pt) is replaced as a whole, so --resume cannot mix the two
    with pytest.warns(UserWarning, match=r"last\.pt, final\.pt, log\.jsonl"):
        train(tiny_config(iterations=2), tiny_data, out, overwrite=True, progress=False)
    assert read_checkpoint(out / "final.pt")["iteration"] == 2
    assert [r["iteration"] for r in read_log(out)] == [2]


def test_resume_without_a_checkpoint_drops_the_log_it_would_repeat(tmp_path, tiny_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"iteration": 1, "total": -1.0}) + "\n")
    with pytest.warns(UserWarning, match="starting afresh.*dropping the records of its log.jsonl"):
        train(tiny_config(), tiny_data, out, resume=True, progress=False)
    assert [r["iteration"] for r in read_log(out)] == [2, 4]


def test_a_kill_between_a_checkpoints_temp_file_and_its_rename_keeps_the_previous_one(
    tmp_path, tiny_data, monkeypatch
):
    import companion._io

    config = tiny_config(iterations=6, log_every=1)
    whole = train(config, tiny_data, tmp_path / "whole", progress=False)
    out = tmp_path / "broken"
    real_replace = os.replace
    renamed = []

    class Killed(BaseException):
        pass

    def dying_replace(src, dst):
        if Path(dst).name == "last.pt":
            renamed.append(int(torch.load(src, weights_only=True)["iteration"]))
            if len(renamed) == 2:  # iteration 4's checkpoint is complete in its temp file
                os.link(src, Path(dst).with_name(".last.pt.killed.tmp"))  # what a kill leaves
                raise Killed
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(companion._io.os, "replace", dying_replace)
        with pytest.raises(Killed):
            train(config, tiny_data, out, progress=False)
    assert renamed == [2, 4]
    assert read_checkpoint(out / "last.pt")["iteration"] == 2  # intact, its sha256 verified
    assert not (out / "final.pt").exists() and (out / ".last.pt.killed.tmp").exists()
    with pytest.warns(UserWarning, match=r"removed 1 unfinished temporary file.*\.last\.pt\.killed\.tmp"):
        final = train(config, tiny_data, out, resume=True, progress=False)
    assert not (out / ".last.pt.killed.tmp").exists()
    assert [r["iteration"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6]
    a, b = read_checkpoint(whole), read_checkpoint(final)
    assert b["iteration"] == 6
    for key in a["model"]:  # continued from iteration 2 exactly as if never interrupted
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_dropout_lr_scale_moves_the_rates_faster_and_only_them(tmp_path):
    data = make_dataset(2, seed=0, shape=(64, 64))
    moved = {}
    for scale in (1.0, 20.0):
        config = TrainConfig.preset("quick", iterations=6, checkpoint_every=6, dropout_lr_scale=scale)
        run = tmp_path / f"scale{scale:g}"
        start = build_model(config)
        final = read_checkpoint(train(config, data, run, progress=False))
        rates = [k for k in final["model"] if k.endswith("p_logit")]
        before = start.state_dict()
        moved[scale] = max(float((final["model"][k] - before[k]).abs()) for k in rates)
        lrs = [g["lr"] for g in final["optimizer"]["param_groups"]]
        assert len(lrs) == (1 if scale == 1.0 else 2)
    assert moved[20.0] > 5 * moved[1.0] > 0
    with pytest.raises(ValueError, match="dropout_lr_scale"):
        TrainConfig(dropout_lr_scale=0.0)


def test_overlap_weight_reaches_the_objective(tmp_path):
    config = TrainConfig.preset("quick", iterations=1, overlap_weight=4.0)
    data = make_dataset(2, seed=0, shape=(64, 64))
    batch = collate_crops([WormCropDataset(data, crop_size=64, length=1, seed=0)[0]])
    batch["target"][0, :4, :4] = 2  # some overlap pixels, whatever the crop holds
    losses = {}
    for weight in (1.0, 4.0):
        torch.manual_seed(0)
        model = build_model(config)
        cfg = TrainConfig.preset("quick", iterations=1, overlap_weight=weight)
        losses[weight] = float(train_step(model, make_optimizer(model, cfg), batch, n_train=2, config=cfg).ce)
    assert losses[4.0] != losses[1.0]
    with pytest.raises(ValueError, match="overlap_weight"):
        TrainConfig(overlap_weight=0.0)


def test_the_step_objective_traces_as_one_graph_and_compile_runs_in_train(tmp_path, monkeypatch):
    import companion.training.step as step_module
    from companion.data.augment import WormCropDataset, collate_crops
    from companion.training.step import build_model, step_objective

    config = TrainConfig.preset("quick", model="baseline")
    torch.manual_seed(0)
    model = build_model(config)
    data = make_dataset(2, seed=0, shape=(96, 96))
    dataset = WormCropDataset(data, crop_size=64, length=2)
    batch = collate_crops([dataset[0], dataset[1]])
    # fullgraph: a graph break (a data-dependent shape, a host read) would raise here
    traced = torch.compile(step_objective, backend="eager", fullgraph=True)
    expected = step_objective(model, batch, n_train=2, config=config)
    got = traced(model, batch, n_train=2, config=config)
    torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(expected)))

    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):  # the eager backend: the same tracing, no C++ build
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(step_module.torch, "compile", eager_compile)
    run = TrainConfig.preset("quick", iterations=4, checkpoint_every=2, compile=True)
    final = train(run, data, tmp_path / "run", progress=False)
    assert compiled == [step_objective] and read_checkpoint(final)["iteration"] == 4
    with pytest.raises(ValueError, match="compile"):
        TrainConfig.preset("quick", compile="yes")


# --------------------------------------------------------------------------------------------
# training to a wall-clock budget
# --------------------------------------------------------------------------------------------
def _on_a_fake_clock(monkeypatch, seconds_per_step) -> tuple[list[float], list]:
    """``train`` timed by a clock that advances ``seconds_per_step(n)`` at step ``n`` (from 1)."""
    import functools

    import companion.training.train as train_module
    from companion.training.budget import TimeBudget

    now, real_step, calls = [0.0], train_module.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        now[0] += seconds_per_step(len(calls))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step)
    monkeypatch.setattr(train_module, "TimeBudget", functools.partial(TimeBudget, clock=lambda: now[0]))
    return now, calls


def test_a_time_budget_sizes_the_schedule_to_end_within_it(tmp_path, monkeypatch):
    now, calls = _on_a_fake_clock(monkeypatch, lambda n: 0.125)
    config = TrainConfig.preset(
        "quick",
        iterations=100_000,
        time_budget=0.1,
        lr_schedule="cosine",
        lr_warmup=4,
        checkpoint_every=1_000,
    )
    final = train(config, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False, started=0.0)
    ckpt = read_checkpoint(final)
    sized = TrainConfig.from_dict(ckpt["config"])
    # 16 steps timed after 2 untimed ones (2 s): 18 + (6 s - 1 s reserve - 2.25 s) / 0.125 s = 40
    assert sized.iterations == 40 and ckpt["iteration"] == len(calls) == 40 and now[0] <= 6.0
    assert sized.lr_at(39) < 0.01 * sized.lr  # the cosine ran to its end


def test_a_time_budget_resizes_a_run_that_slows_down(tmp_path, monkeypatch):
    now, calls = _on_a_fake_clock(monkeypatch, lambda n: 0.125 if n < 30 else 1.0)  # slow from 30 on
    config = TrainConfig.preset("quick", iterations=100_000, time_budget=0.1, checkpoint_every=1_000)
    final = train(config, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False, started=0.0)
    ckpt = read_checkpoint(final)
    # sized 40 at step 18 and at half time (3 s); at 75 % (after step 30, 4.6 s) the new rate
    # leaves room for one more step: the schedule shrinks to 31 and completes in time
    assert TrainConfig.from_dict(ckpt["config"]).iterations == ckpt["iteration"] == len(calls) == 31
    assert now[0] <= 6.0


def test_a_time_budget_stops_a_run_that_slows_down_late_with_a_checkpoint(tmp_path, monkeypatch):
    now, calls = _on_a_fake_clock(monkeypatch, lambda n: 0.25 if n < 220 else 1.0)  # after the last sizing
    config = TrainConfig.preset("quick", iterations=100_000, time_budget=1.0, checkpoint_every=1_000)
    final = train(config, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False, started=0.0)
    ckpt = read_checkpoint(final)
    assert TrainConfig.from_dict(ckpt["config"]).iterations == 232  # sized last at 90 % (54 s)
    assert ckpt["iteration"] == len(calls) == 224 and now[0] <= 60.0  # cut short within the 60 s
    assert read_checkpoint(tmp_path / "last.pt")["iteration"] == 224


def test_init_from_takes_the_name_of_a_shipped_model(tmp_path):
    from companion.training.checkpoint import init_source, shipped_model_file

    if shipped_model_file("baseline") is None:
        pytest.skip("the shipped models are not in this copy of the package")
    weights, kwargs = init_source("baseline")
    exported, _ = init_source(str(shipped_model_file("baseline")))
    assert all(torch.equal(weights[k], exported[k]) for k in exported)
    config = TrainConfig.preset("cpu", model="concrete", crop_size=64, iterations=1, checkpoint_every=1)
    config = TrainConfig.from_dict({**config.to_dict(), **{"init_from": "baseline", "num_workers": 0}})
    final = train(config, make_dataset(1, seed=0, shape=(96, 96)), tmp_path, progress=False)
    assert read_checkpoint(final)["config"]["init_from"] == "baseline"  # the name, not a path
