"""Media2Face: the denoiser overfits, CFG masks and guidance behave as specified, 2-worker DDP runs
through Ray Train on the real shards, resume continues the same loss curve, generation handles
long audio (shapes and window continuity), the CLI generates an animation and a video."""
import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from models.media2face import (M2FConfig, Media2Face, cfg_masks, ddim_sample, generate_long, guided_x0,
                               training_loss)

REPO = Path(__file__).resolve().parents[1]
M2FD = [str(REPO / ".venv" / "bin" / "m2fd")] if (REPO / ".venv" / "bin" / "m2fd").exists() else ["m2fd"]
TINY = {"width": 64, "layers": 2, "heads": 4, "window": 40, "dropout": 0.0, "z_dim": 8, "audio_dim": 16}


def test_regions_match_mediapipe():
    from mediapipe.python.solutions import face_mesh_connections as c

    from storage_schemas.regions import LIPS, UPPER_FACE

    assert LIPS == tuple(sorted({i for e in c.FACEMESH_LIPS for i in e}))
    up = (c.FACEMESH_LEFT_EYE, c.FACEMESH_RIGHT_EYE, c.FACEMESH_LEFT_EYEBROW, c.FACEMESH_RIGHT_EYEBROW)
    assert UPPER_FACE == tuple(sorted({i for s in up for e in s for i in e}))


def test_published_architecture_and_schedule():
    cfg = M2FConfig()
    assert (cfg.layers, cfg.heads, cfg.width, cfg.window, cfg.steps) == (8, 4, 512, 200, 500)
    m = Media2Face(cfg)
    assert len(m.decoder.layers) == 8 and m.decoder.layers[0].self_attn.num_heads == 4
    ab = m.alphas_cumprod
    assert len(ab) == 500 and ab[0] > 0.999 and ab[-1] < 1e-3 and bool((ab[1:] < ab[:-1]).all())


def test_decoder_is_torchs_transformer_decoder_with_fused_kernels():
    """Same parameters and function as nn.TransformerDecoder(norm_first=True) with the alignment mask
    (checkpoints load both ways); the FlexAttention band used when compiled on CUDA is the same mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

    from models.media2face import Decoder, band_mask, band_mod

    torch.manual_seed(0)
    cfg = M2FConfig(**{**TINY, "dropout": 0.1, "align_frames": 3})
    ref = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(
        cfg.width, cfg.heads, cfg.ff_mult * cfg.width, cfg.dropout, activation="gelu", batch_first=True,
        norm_first=True), cfg.layers).eval()
    new = Decoder(cfg).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    assert set(Decoder(cfg).state_dict()) == set(ref.state_dict())
    n = 24
    x, mem = torch.randn(2, n, cfg.width), torch.randn(2, 2 + n, cfg.width)
    with torch.no_grad():
        want = ref(x, mem, memory_mask=~band_mask(n, 2, 3))
        got = new(x, mem, n_global=2)
        unmasked = ref(x, mem)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, unmasked, atol=1e-3)  # the band really masks
    row = band_mask(n, 2, 3)[10]  # frame 10 sees the two global tokens and audio frames 7..13
    assert row.nonzero().flatten().tolist() == [0, 1] + [2 + j for j in range(7, 14)]
    # FlexAttention's mask_mod is exactly the band mask, and its (unfused, eager) result equals SDPA's
    assert torch.equal(create_mask(band_mod(2, 3), None, None, n, n + 2, device="cpu")[0, 0], band_mask(n, 2, 3))
    q, k, v = torch.randn(2, 4, n, 16), torch.randn(2, 4, n + 2, 16), torch.randn(2, 4, n + 2, 16)
    bm = create_block_mask(band_mod(2, 3), None, None, n, n + 2, device="cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(n, 2, 3))
    assert torch.allclose(flex_attention(q, k, v, block_mask=bm), sdpa, atol=1e-5)
    with pytest.raises(ValueError, match="attn_kernel"):
        M2FConfig(attn_kernel="flash")
    with pytest.raises(ValueError, match="attention dropout"):
        M2FConfig(attn_kernel="flex")
    assert M2FConfig(attn_kernel="flex", attn_dropout=0.0).attention_dropout == 0.0
    assert M2FConfig(dropout=0.2).attention_dropout == 0.2


def test_cfg_masks_follow_the_two_paper_masks():
    cfg = M2FConfig(p_drop_style=0.2, p_drop_all=0.1)
    da, ds = cfg_masks(200_000, cfg, torch.Generator().manual_seed(0))
    assert abs(da.float().mean().item() - 0.1) < 0.005
    assert abs(ds.float().mean().item() - 0.3) < 0.005
    assert not (da & ~ds).any()  # audio is only ever dropped together with style


def test_dropped_conditions_are_ignored_and_guidance_combines_three_branches():
    torch.manual_seed(0)
    cfg = M2FConfig(**TINY, style_dim=12)
    m = Media2Face(cfg).eval()
    with torch.no_grad():  # make the null embeddings non-trivial
        m.null_audio.normal_()
        m.null_style.normal_()
    b, n = 2, cfg.window
    x = torch.randn(b, n, cfg.motion_dim)
    t = torch.tensor([10, 300])
    a1, a2 = torch.randn(b, n, cfg.audio_dim), torch.randn(b, n, cfg.audio_dim)
    s1, s2 = torch.randn(b, 12), torch.randn(b, 12)
    tt, ff = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    with torch.no_grad():
        g0 = m(x, t, a1, s1, tt, tt)
        assert torch.allclose(g0, m(x, t, a2, s2, tt, tt), atol=1e-5)  # drop all: neither matters
        ga = m(x, t, a1, s1, ff, tt)
        assert torch.allclose(ga, m(x, t, a1, s2, ff, tt), atol=1e-5)  # style dropped: style does not matter
        assert not torch.allclose(ga, m(x, t, a2, s1, ff, tt), atol=1e-3)  # audio does
        gap = m(x, t, a1, s1, ff, ff)
        assert not torch.allclose(gap, ga, atol=1e-3)
        got = guided_x0(m, x, t, a1, s1, 2.5, 1.5)
    assert torch.allclose(got, (1 - 2.5 - 1.5) * g0 + 2.5 * ga + 1.5 * gap, atol=1e-4)


def test_small_model_overfits_a_few_windows():
    torch.manual_seed(0)
    cfg = M2FConfig(**TINY, style_dim=0, p_drop_style=0.0, p_drop_all=0.0)
    m = Media2Face(cfg)
    n = cfg.window
    tt = torch.linspace(0, 6.28, n)
    audio = torch.stack([torch.sin(tt[:, None] * (k + 1) + torch.arange(cfg.audio_dim)) for k in range(4)])
    x0 = torch.cat([audio[..., : cfg.z_dim] * 0.8, audio[..., : 6].roll(3, 1) * 0.3], -1)  # motion follows audio
    mask = torch.ones(4, n, dtype=torch.bool)
    baseline = ((x0 - x0.mean((0, 1))) ** 2).mean().item()  # the mean-motion predictor's simple loss
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    hist = []
    for _ in range(300):
        L = training_loss(m, x0, audio, None, mask, g)
        opt.zero_grad()
        L["loss"].backward()
        opt.step()
        hist.append(L["simple"].item())
    assert np.mean(hist[-20:]) < 0.2 * baseline, (np.mean(hist[-20:]), baseline)
    m.eval()
    out = ddim_sample(m, audio[:1], None, n_steps=20, s_audio=1.0, generator=torch.Generator().manual_seed(1))
    assert ((out - x0[:1]) ** 2).mean().item() < 0.5 * baseline


def test_long_audio_generation_shapes_and_window_continuity():
    torch.manual_seed(0)
    cfg = M2FConfig(**TINY, style_dim=12)
    m = Media2Face(cfg).eval()
    audio = torch.randn(123 + 2 * cfg.window, cfg.audio_dim)
    out = generate_long(m, audio, torch.randn(12), n_steps=5, overlap=10)
    assert out.shape == (len(audio), cfg.motion_dim) and torch.isfinite(out).all()
    short = generate_long(m, audio[:7], None, n_steps=5)
    assert short.shape == (7, cfg.motion_dim)
    # continuing a window pins its first frames to the previous window's motion
    known = torch.randn(1, cfg.window, cfg.motion_dim)
    km = torch.zeros(1, cfg.window, dtype=torch.bool)
    km[0, :10] = True
    x = ddim_sample(m, audio[None, : cfg.window], None, n_steps=5, known=known, known_mask=km)
    assert torch.equal(x[0, :10], known[0, :10])


@pytest.fixture(scope="module")
def trained(real_run, tiny_clip, tmp_path_factory):
    """Two Ray Train runs on the real shards (2 DDP workers, gloo): one straight to step 6 (run_training),
    and one launched by the Dagster training job (in-process, as the UI launches it) that resumes from the
    first run's step-3 checkpoint (its run directory as it was after step 3) to step 6. Stopping a run
    (signals) is tested through `m2fd train` below."""
    import dagster as dg

    from models.m2f_train import TrainConfig
    from pipelines.dagster_defs import M2FDResource, build_defs
    from pipelines.train import run_training

    out, _ = real_run
    base = tmp_path_factory.mktemp("train")
    model = {"width": 64, "layers": 2, "heads": 4}
    settings = dict(log_every=1, val_every=6, ckpt_every=3, loader_workers=0, warmup=2, val_steps=4,
                    val_max_windows=2, lr=1e-3)
    m1 = run_training(TrainConfig(dataset=str(out), style_encoder=str(tiny_clip), model=model, batch_size=1,
                                  max_steps=6, run_dir=str(base / "straight"), **settings), workers=2, cpus_per_worker=1)
    res = base / "resumed"
    shutil.copytree(base / "straight" / "checkpoints" / "step-00000003", res / "checkpoints" / "step-00000003")
    rows = (base / "straight" / "metrics.csv").read_text().splitlines(keepends=True)
    (res / "metrics.csv").write_text("".join(rows[:4]))  # the header and steps 1-3
    first_part = list(csv.DictReader(open(res / "metrics.csv")))
    job = build_defs(M2FDResource(out=str(out), take_lock=False, executor="local")).resolve_job_def("m2fd_train")
    instance = dg.DagsterInstance.ephemeral()
    run = job.execute_in_process(run_config={"ops": {"media2face_model": {"config": {
        "run_dir": str(res), "max_steps": 6, "batch_size": 1, "workers": 2, "cpus_per_worker": 1,
        "style_encoder": str(tiny_clip), "model": model, "settings": settings}}}}, instance=instance)
    return base, m1, (run, instance), first_part


def test_ray_train_ddp_runs_and_validates(trained):
    base, m1, _, _ = trained
    rows = list(csv.DictReader(open(base / "straight" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert m1["step"] == 6
    last = rows[-1]
    for k in ("val_lve", "baseline_lve", "val_fdd", "baseline_fdd"):
        assert np.isfinite(float(last[k])) and float(last[k]) >= 0
    assert int(last["val_windows"]) >= 1
    ck = base / "straight" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000003", "step-00000006"]
    assert {p.name for p in (ck / "step-00000006").iterdir()} == {"model.safetensors", "ema.safetensors",
                                                                    "optimizer.safetensors", "state.json"}
    assert list((base / "straight" / "tb").glob("events.out.tfevents.*"))
    best = json.loads((base / "straight" / "best" / "state.json").read_text())  # lowest validation LVE so far
    assert best["best_step"] == 6 and best["best_val_lve"] == pytest.approx(float(last["val_lve"]))


def test_resume_continues_the_same_loss_curve(trained):
    base, m1, _, first_part = trained
    straight = list(csv.DictReader(open(base / "straight" / "metrics.csv")))
    resumed = list(csv.DictReader(open(base / "resumed" / "metrics.csv")))
    assert [int(r["step"]) for r in first_part] == [1, 2, 3]
    assert [int(r["step"]) for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])
    assert float(straight[-1]["val_lve"]) == pytest.approx(float(resumed[-1]["val_lve"]), rel=1e-5)


def test_cli_generates_animation_and_video(trained, tmp_path):
    base, _, _, _ = trained
    ck = base / "straight" / "checkpoints" / "step-00000006"
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello there. This is a longer sentence so that the audio is "
                    "longer than one window of two hundred frames, which takes a while to say."], check=True)
    out, vid = tmp_path / "anim.npz", tmp_path / "anim.mp4"
    r = subprocess.run(M2FD + ["generate", str(ck), "--audio", str(wav), "--prompt", "a cheerful person",
                               "--out", str(out), "--video", str(vid), "--steps", "4"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = np.load(out, allow_pickle=False)

    def ffprobe(p, what):
        return subprocess.run(["ffprobe", "-v", "error", "-show_entries", what, "-of", "csv=p=0", str(p)],
                              capture_output=True, text=True, check=True).stdout.split()

    dur = float(ffprobe(wav, "format=duration")[0])
    assert a["latents"].shape[0] == round(dur * 30) > 200 and a["pose"].shape == (a["latents"].shape[0], 6)
    assert abs(float(ffprobe(vid, "format=duration")[0]) - dur) < 0.2
    assert sorted(ffprobe(vid, "stream=codec_name")) == ["aac", "h264"]
    bad = subprocess.run(M2FD + ["generate", str(ck), "--audio", str(wav), "--prompt", "x", "--image", str(wav),
                                 "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0


def test_dagster_train_job_launches_the_same_training(trained):
    """The resumed run of the fixture was launched by the Dagster job: its progress is in the run's log
    while it runs, and the materialisation carries the last step's metrics and checkpoint."""
    base, _, (r, instance), _ = trained
    assert r.success
    msgs = [e.user_message for e in instance.all_logs(r.run_id)]
    assert any(m.startswith("step 4/6, loss ") for m in msgs)  # resumed after step 3
    assert not any(m.startswith("step 1/6, loss ") for m in msgs)
    assert any(m.startswith("step 6/6, loss ") for m in msgs) and any("validation at step 6" in m for m in msgs)
    md = r.get_asset_materialization_events()[0].materialization.metadata
    assert md["step"].value == 6 and md["val_lve"].value >= 0
    assert md["checkpoint"].value == str(base / "resumed" / "checkpoints" / "step-00000006")


def test_random_state_of_another_device_type_is_a_clear_error():
    from models.m2f_train import _restore_rng, _rng_states

    g = torch.Generator().manual_seed(3)
    saved = _rng_states(g)
    assert set(saved) == {"gen", "torch"}  # CPU run: no CUDA stream to keep
    a = torch.rand(4, generator=g)
    _restore_rng(g, saved)
    assert torch.equal(torch.rand(4, generator=g), a)
    with pytest.raises(ValueError, match="another device type"):  # e.g. a CUDA generator's 16-byte state
        _restore_rng(g, {"gen": torch.zeros(16, dtype=torch.uint8), "torch": torch.get_rng_state()})


def test_compiled_training_step_equals_eager():
    """What the trainer runs on GPUs: the whole loss (noising, denoiser with style, loss terms) as one
    torch.compile'd module gives the eager losses and gradients for the same random draws."""
    from models.media2face import DiffusionLoss

    torch.manual_seed(0)
    cfg = M2FConfig(**TINY, style_dim=12)
    m = Media2Face(cfg).eval()  # no dropout: the two runs see the same function
    b, n = 3, cfg.window
    x0, audio, style = torch.randn(b, n, cfg.motion_dim), torch.randn(b, n, cfg.audio_dim), torch.randn(b, 12)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n // 2:] = False
    got = []
    for fwd in (None, torch.compile(DiffusionLoss(m))):
        m.zero_grad()
        L = training_loss(m, x0, audio, style, mask, torch.Generator().manual_seed(3), forward=fwd)
        L["loss"].backward()
        got.append((torch.stack([L[k] for k in DiffusionLoss.names]).detach(), [p.grad.clone() for p in m.parameters()]))
    (l0, g0), (l1, g1) = got
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6), (l0, l1)
    assert max((a - c).abs().max().item() for a, c in zip(g0, g1)) < 1e-5
    assert sum(int(g.abs().sum() > 0) for g in g0) >= len(g0) - 2  # all but the nulls of conditions not dropped


def test_residual_stream_dtype_under_autocast():
    """residual_dtype "compute" keeps the decoder's residual stream in autocast's dtype (bf16) and gives
    nearly the fp32-stream function; without autocast both settings are the same function."""
    torch.manual_seed(0)
    outs, dtypes = {}, {}
    for rd in ("float32", "compute"):
        torch.manual_seed(0)
        m = Media2Face(M2FConfig(**TINY, style_dim=0, residual_dtype=rd)).eval()
        b, n = 2, m.cfg.window
        args = (torch.randn(b, n, m.cfg.motion_dim, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 400]),
                torch.randn(b, n, m.cfg.audio_dim, generator=torch.Generator().manual_seed(2)), None,
                torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool))
        m.decoder.layers[1].register_forward_pre_hook(lambda mod, a: dtypes.__setitem__(rd, a[0].dtype))
        with torch.no_grad():
            outs[rd, "fp32"] = m(*args)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs[rd, "bf16"] = m(*args).float()
    assert dtypes == {"float32": torch.float32, "compute": torch.bfloat16}
    assert torch.equal(outs["float32", "fp32"], outs["compute", "fp32"])
    err = (outs["compute", "bf16"] - outs["float32", "fp32"]).abs().max() / outs["float32", "fp32"].abs().max()
    assert err < 0.05, err
    with pytest.raises(ValueError, match="residual_dtype"):
        M2FConfig(residual_dtype="bf16")


def test_compile_mode_and_inductor_options_are_exclusive(tmp_path):
    """torch.compile takes a mode or inductor options; the trainer's config says so before any work."""
    from models.m2f_train import TrainConfig

    assert TrainConfig(compile=True, compile_options={"max_autotune_gemm": True}).compile_options
    with pytest.raises(ValueError, match="compile_mode or compile_options"):
        TrainConfig(compile=True, compile_mode="max-autotune", compile_options={"max_autotune_gemm": True})
    r = subprocess.run(M2FD + ["train", str(tmp_path), "--set", "compile_mode=max-autotune", "--set",
                               "compile_options={max_autotune_gemm: true}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "compile_mode or compile_options" in r.stderr


def test_progress_reaches_the_driver_and_the_estimate_holds(real_run, tmp_path):
    """Logged steps reach the driver through Ray Train's reporting every few seconds (validation rounds
    and the last step always), without slowing the steps, and the whole-run estimate made after the
    first timed steps is within a factor of 2 of the real time."""
    import time

    from models.m2f_train import TrainConfig
    from pipelines.train import REPORT_EVERY_S, run_training

    out, _ = real_run
    seen: list[tuple[float, dict]] = []
    tcfg = TrainConfig(dataset=str(out), run_dir=str(tmp_path / "run"), model={"width": 64, "layers": 2, "heads": 4},
                       batch_size=2, max_steps=200, log_every=10, val_every=100, val_steps=2, val_max_windows=1,
                       ckpt_every=1000, loader_workers=0, warmup=2)
    m = run_training(tcfg, workers=1, cpus_per_worker=2, on_progress=lambda r: seen.append((time.perf_counter(), r)),
                     handle_signals=False)
    t_end = time.perf_counter()
    logged = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    assert logged == [1] + list(range(10, 201, 10)) and m["step"] == 200 and not m["stopped"]
    steps = [r["step"] for _, r in seen]
    assert steps[0] == 1 and steps[-1] == 200 and set(steps) <= set(logged) and steps == sorted(steps)
    assert {100, 200} <= {r["step"] for _, r in seen if r["validation"]} and "val_lve" in seen[-1][1]
    gaps = [b[1]["elapsed_s"] - a[1]["elapsed_s"] for a, b in zip(seen, seen[1:])]
    assert max(gaps) < REPORT_EVERY_S + 10, gaps  # the bar moves every few seconds
    assert all(r["max_steps"] == 200 and r["loss"] > 0 and "samples_per_s" in r for _, r in seen)
    t_est, first = next((t, r) for t, r in seen if r.get("eta_s") is not None)
    real_left = t_end - t_est
    assert first["step"] < 100 and 0.5 <= real_left / first["eta_s"] <= 2.0, (first, real_left)
    from pipelines.train_progress import describe, estimate_line

    assert f"step {first['step']}/200" in describe(first) and "estimate:" in estimate_line(first, on_cpu=True)


def test_sigint_and_sigterm_stop_training_cleanly_and_it_resumes(real_run, tmp_path):
    """`m2fd train` stopped by SIGINT keeps a checkpoint at the step it stopped, leaves no Ray process,
    and the same command resumes from there (not from step 1); SIGTERM does the same."""
    import signal
    import time

    from pipelines.procs import descendants, proc_stat

    out, _ = real_run
    run = tmp_path / "run"
    cmd = M2FD + ["train", str(out), "--out", str(run), "--set", "max_steps=100000", "--set", "model.width=64",
                  "--set", "model.layers=2", "--set", "model.heads=4", "--set", "batch_size=1", "--set", "log_every=2",
                  "--set", "ckpt_every=100000", "--set", "val_every=0", "--set", "loader_workers=0"]

    def steps() -> list[int]:
        p = run / "metrics.csv"
        return [int(r["step"]) for r in csv.DictReader(open(p))] if p.is_file() else []

    stopped_at = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = len(steps())
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while len(steps()) < before + 3:
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
            time.sleep(0.2)
        tree = descendants(p.pid)
        p.send_signal(sig)
        text, _ = p.communicate(timeout=180)
        assert p.returncode == 130, text[-3000:]
        assert "stopped" in text and "resumes" in text
        ck = sorted((run / "checkpoints").iterdir())[-1]
        step = json.loads((ck / "state.json").read_text())["step"]
        assert step >= steps()[before + 2], (step, steps())
        stopped_at.append(step)
        time.sleep(1.0)
        alive = [pid for pid in tree - {p.pid} if (proc_stat(pid) or ["Z"])[0] != "Z"]
        assert not alive, alive  # the Ray workers, raylet and GCS are gone
    rows = steps()
    assert rows.count(1) == 1  # the second launch resumed: it logged no step 1 again
    assert stopped_at[1] > stopped_at[0] and rows[-1] >= stopped_at[1] - 2


def test_a_batch_larger_than_the_clips_is_a_clear_error_before_anything_starts(real_run, tmp_path):
    """The demo dataset has a few training clips (one window each per epoch): the default batch of 8
    used to make every epoch empty and the run wait forever; now `m2fd train` says so at once."""
    out, _ = real_run
    r = subprocess.run(M2FD + ["train", str(out), "--out", str(tmp_path / "run"), "--set", "max_steps=2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = " ".join(r.stderr.split())
    assert "fewer than batch_size=8" in err and "use --set batch_size=" in err
    assert not (tmp_path / "run" / "metrics.csv").exists()
