"""Extraction on the real videos: landmarks, pose, GNPFA, transcripts, audio features, quality."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.audio_features import log_mel_30fps, rms_db_30fps
from extractors.extract import features_from_npz, lip_sync_proxy
from extractors.pose import (STABLE, build_template, head_pose, load_template, normalise, rotation_angle_deg,
                             similarity_fit)
from extractors.records import split_tail, training_arrays
from models.gnpfa import (GNPFAConfig, encode_frames, encode_images, load_checkpoint, reconstruct, save_checkpoint,
                          train_geometry, train_image)
from storage_schemas import open_dataset

SR = 16000


def _rot(yaw, pitch, roll):
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


@pytest.mark.parametrize("angles", [(0, 0, 0), (25, -10, 5), (-40, 15, -12), (10, 30, 20)])
def test_pose_recovers_a_known_rotation(angles):
    tpl = load_template()
    rng = np.random.default_rng(1)
    r_true = _rot(*angles)
    mesh = 180.0 * tpl @ r_true.T + np.array([250.0, 300.0, 10.0])
    mesh[STABLE] += rng.normal(0, 0.3, (len(STABLE), 3))  # landmark noise (pixels)
    mouth = [13, 14, 61, 291, 78, 308]
    mesh[mouth] += 15 * rng.normal(size=(len(mouth), 3))  # expression on non-stable points: must not matter
    s, r, t, resid = head_pose(mesh, tpl)
    assert rotation_angle_deg(r, r_true) < 0.5
    assert abs(s - 180.0) / 180.0 < 0.01
    assert np.allclose(normalise(mesh, s, r, t)[STABLE], tpl[STABLE], atol=0.02)


def test_landmark_fast_path_matches_protobuf(real_dir):
    import decord
    from mediapipe.python.solutions import face_mesh

    from extractors.landmarks import landmarks_to_array

    frame = decord.VideoReader(str(real_dir / "d14.mp4"))[10].asnumpy()
    with face_mesh.FaceMesh(refine_landmarks=True) as fm:
        lms = fm.process(frame).multi_face_landmarks[0]
    slow = np.array([(p.x, p.y, p.z) for p in lms.landmark], np.float32)
    assert slow.shape == (478, 3) and np.array_equal(landmarks_to_array(lms), slow)
    lms.landmark[0].visibility = 0.5  # an unexpected field falls back to the slow path, still right
    assert np.array_equal(landmarks_to_array(lms), slow)


def test_template_is_canonical_and_rebuildable():
    tpl = load_template()
    assert tpl.shape == (478, 3)
    assert abs(np.linalg.norm(tpl[263] - tpl[33]) - 1.0) < 1e-4  # IOD units
    assert abs(tpl[263, 1] - tpl[33, 1]) < 1e-4 and tpl[152, 1] > tpl[10, 1]  # eyes level, chin below forehead
    # rebuilding from randomly posed copies gives the same shape back
    rng = np.random.default_rng(0)
    meshes = np.stack([120 * tpl @ _rot(*rng.uniform(-20, 20, 3)).T + rng.uniform(0, 300, 3) for _ in range(8)])
    again = build_template(meshes)
    s, r, t = similarity_fit(again, tpl)
    assert np.abs((s * again @ r.T + t) - tpl).max() < 1e-3


def test_real_run_has_every_frame_at_30fps(real_run):
    out, _ = real_run
    ds = open_dataset(out)
    clips = {c["clip_id"]: c for c in ds.table("clips").to_pylist()}
    got = ds.query("select clip_id, count(*) n, min(frame) f0, max(frame) f1, count(*) filter (where tracked) tr, "
                   "min(len(gnpfa_z)) zmin, max(len(gnpfa_z)) zmax, max(abs(t_s - (select start_s from clips c "
                   "where c.clip_id = frames.clip_id) - frame / 30.0)) dt from frames group by 1").to_pylist()
    assert {g["clip_id"] for g in got} == set(clips)
    for g in got:
        c = clips[g["clip_id"]]
        assert g["n"] == c["n_frames"] and g["f0"] == 0 and g["f1"] == c["n_frames"] - 1
        assert g["tr"] >= 0.95 * g["n"]  # the shared talking faces are tracked nearly throughout
        assert g["zmin"] == g["zmax"] == 32 and g["dt"] < 1e-6
    lm = ds.query("select landmarks from frames where tracked limit 1").column(0).to_pylist()[0]
    assert len(lm) == 478 * 3 and 0 <= min(lm[0::3]) and max(lm[0::3]) <= 1
    # MediaPipe's facial transformation matrix on every tracked frame, from the same landmarks: a similarity
    # transform whose head motion follows our own pose fit
    from extractors.pose import rotation_angle_deg

    flip = np.diag([1.0, -1.0, -1.0])  # canonical face space (y up, z to the camera) -> image axes
    for cid in clips:
        rows = ds.query(f"select tracked, face_transform, rotation from frames where clip_id = '{cid}' order by frame"
                        ).to_pylist()
        assert all((r["face_transform"] is not None) == r["tracked"] for r in rows)
        m = np.array([r["face_transform"] for r in rows if r["tracked"]], np.float64).reshape(-1, 4, 4)
        assert np.allclose(m[:, 3], [0, 0, 0, 1])
        r_mp = m[:, :3, :3] / np.linalg.norm(m[:, :3, 0], axis=1)[:, None, None]
        assert np.allclose(r_mp @ r_mp.transpose(0, 2, 1), np.eye(3), atol=1e-4) and (np.linalg.det(r_mp) > 0).all()
        r_mp = flip @ r_mp @ flip
        r_ours = np.array([r["rotation"] for r in rows if r["tracked"]], np.float64).reshape(-1, 3, 3)
        motion = [rotation_angle_deg(a @ r_ours[0].T, b @ r_mp[0].T) for a, b in zip(r_ours, r_mp)]
        assert np.mean(motion) < 4.0, (cid, np.mean(motion))
    feats = ds.table("clip_features").to_pylist()
    assert all(f["recon_err"] < 2.0 for f in feats)
    # the default sync gate drops s18's clip (its mouth leads its sound by ~0.25 s: bench/RESULTS.md), no other
    assert {clips[f["clip_id"]]["uri"].rsplit("/", 1)[-1]: f["drop_reason"] for f in feats if f["status"] != "ok"} == \
        {"s18.mp4": "poor_sync"}
    tr = ds.table("transcripts").to_pylist()
    assert all(t["engine"].startswith(("faster-whisper:", "whisper:", "pocketsphinx:")) for t in tr)
    # the clips the checks keep are transcribed (together, per source); the dropped one is not
    assert {t["clip_id"] for t in tr} == {f["clip_id"] for f in feats if f["status"] == "ok"}
    assert all((f["transcript_engine"] is None) == (f["status"] != "ok") for f in feats)
    card = json.loads((out / "dataset.json").read_text())
    from models.gnpfa import SHIPPED_NAME, SHIPPED_SHA256

    g = card["lineage"]["checkpoints"]["gnpfa"]  # the default: the shipped GNPFA, the dataset's own copy of it
    assert g["kind"] == "shipped" and g["name"] == SHIPPED_NAME and g["sha256"] == SHIPPED_SHA256
    assert (out / g["path"] / "model.safetensors").read_bytes() == \
        (Path(__file__).resolve().parents[1] / "models" / "assets" / SHIPPED_NAME / "model.safetensors").read_bytes()
    assert {f["gnpfa_checkpoint"] for f in feats} == {SHIPPED_SHA256}
    assert card["counts"]["frames"] == sum(c["n_frames"] for c in clips.values())


def _real_training_data(out):
    feats = []
    for js in sorted((out / "parts" / "extract").glob("*.json")):
        feats += features_from_npz(str(js.with_suffix(".npz")), json.loads(js.read_text())["clips"])
    tr, te = split_tail(feats)
    return training_arrays(tr), training_arrays(te)


def test_vae_beats_the_mean_face_on_held_out_frames(real_run, tmp_path):
    out, _ = real_run
    tr, te = _real_training_data(out)
    cfg = GNPFAConfig(hidden=256)
    vae = train_geometry(tr["offsets"], tr["neutrals"], cfg, steps=400)
    _, dec = reconstruct(vae, te["offsets"], te["neutrals"])
    err = np.linalg.norm(dec - te["offsets"], axis=-1).mean()
    baseline = np.linalg.norm(tr["offsets"].mean(0) - te["offsets"], axis=-1).mean()
    assert err < 0.6 * baseline, (err, baseline)
    # identity lives in the decoder's condition: the same z on another speaker's neutral changes the mesh
    z, _ = reconstruct(vae, te["offsets"][:1], te["neutrals"][:1])
    other = te["neutrals"][-1:]
    with torch.no_grad():
        d1 = vae.decode(torch.as_tensor(z), torch.as_tensor(te["neutrals"][:1]))
        d2 = vae.decode(torch.as_tensor(z), torch.as_tensor(other))
    assert torch.isfinite(d1).all() and torch.isfinite(d2).all()
    # checkpoint round trip: safetensors + config, identified by hash; tampering is caught
    sha = save_checkpoint(tmp_path / "ck", cfg, vae, None)
    _, vae2, enc2, sha2 = load_checkpoint(tmp_path / "ck")
    assert sha2 == sha and enc2 is None
    _, dec2 = reconstruct(vae2, te["offsets"][:8], te["neutrals"][:8])
    assert np.allclose(dec2, dec[:8], atol=1e-6)
    blob = bytearray((tmp_path / "ck" / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "ck" / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tmp_path / "ck")


def test_image_encoder_learns_the_mesh_path(real_run):
    out, _ = real_run
    tr, _ = _real_training_data(out)
    cfg = GNPFAConfig(hidden=128, enc_width=8, crop_size=tr["crops"].shape[1], head_pool=2)  # the shipped head
    vae = train_geometry(tr["offsets"], tr["neutrals"], cfg, steps=120)
    idx = np.arange(0, len(tr["crops"]), 3)
    sub = {k: v[idx] for k, v in tr.items()}
    enc = train_image(sub["crops"], sub["offsets"], sub["neutrals"], sub["rotations"], vae, cfg, steps=80, batch=64)
    _, r_hat = encode_images(enc, sub["crops"], batch=128)
    err = np.mean([rotation_angle_deg(a, b) for a, b in zip(r_hat, sub["rotations"])])
    spread = np.mean([rotation_angle_deg(np.eye(3), b) for b in sub["rotations"]])
    assert err < 0.5 * spread, (err, spread)


def test_folded_image_encoder_is_the_same_function_and_leaves_the_model_alone(real_run):
    from models.gnpfa import folded
    from storage_schemas.dataset import gnpfa_checkpoint_dir

    out, _ = real_run
    _, _, enc, _ = load_checkpoint(gnpfa_checkpoint_dir(out, required=True))
    enc.train()  # batch norms in training mode must survive the fold untouched
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    f = folded(enc)
    assert enc.training and all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in f.modules())
    from storage_schemas.arrays import read_array

    cid = open_dataset(out).query("select clip_id from clip_features where status = 'ok' order by clip_id limit 1")
    crops = np.ascontiguousarray(read_array(out, "crops", cid.column(0)[0].as_py())[:64])
    enc.eval()
    with torch.inference_mode():
        x = torch.from_numpy(crops)
        (z0, r0), (z1, r1) = enc(x), f(x)
    assert torch.abs(z1 - z0).max() <= 1e-4 * torch.abs(z0).max() and torch.abs(r1 - r0).max() < 1e-4
    z2, _ = encode_images(enc, crops, batch=32)  # inference folds; the result is the eval model's
    assert np.abs(z2 - z0.numpy()).max() <= 1e-4 * float(torch.abs(z0).max())


def test_encoding_latents_do_not_depend_on_the_thread_count(real_run):
    """An encoding task runs torch on the one CPU it asks for (more threads oversubscribed the cores); the
    latents of real frames with the shipped GNPFA are bit-identical at 1 and 2 threads, so the thread
    count is not part of the result."""
    from storage_schemas.dataset import gnpfa_checkpoint_dir

    out, _ = real_run
    _, vae, enc, _ = load_checkpoint(gnpfa_checkpoint_dir(out, required=True))
    a = training_arrays(features_from_npz(*next((str(js.with_suffix(".npz")), json.loads(js.read_text())["clips"])
                                                for js in sorted((out / "parts" / "extract").glob("*.json")))))
    n = min(96, len(a["crops"]))
    prev = torch.get_num_threads()
    res = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res.append(encode_frames(vae, enc, a["offsets"][:n], a["neutrals"][:n], a["crops"][:n]))
    finally:
        torch.set_num_threads(prev)
    assert n >= 32 and res[0].keys() == res[1].keys()
    for k in res[0]:
        assert np.array_equal(res[0][k], res[1][k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_encoding_agree():
    cfg = GNPFAConfig()
    from models.gnpfa import ImageEncoder

    torch.manual_seed(0)
    enc = ImageEncoder(cfg).eval()
    crops = np.random.default_rng(0).integers(0, 255, (2048, 64, 64, 3), dtype=np.uint8)
    z_cpu, r_cpu = encode_images(enc, crops, device="cpu", amp=False)
    z_gpu, r_gpu = encode_images(enc.cuda(), crops, device="cuda", batch=512)  # bf16 autocast
    assert np.abs(z_gpu - z_cpu).max() / np.abs(z_cpu).max() < 0.05
    assert np.mean([rotation_angle_deg(a, b) for a, b in zip(r_gpu, r_cpu)]) < 1.0


def test_audio_features_are_aligned_to_frames():
    n = 60  # 2 s
    t = np.arange(SR * 2) / SR
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    tone[SR:] = 0  # silence in the second second
    mel = log_mel_30fps(tone, n)
    db = rms_db_30fps(tone, n)
    assert mel.shape == (n, 80) and mel.dtype == np.float32
    assert abs(db[5] - 20 * np.log10(0.5 / np.sqrt(2))) < 0.5 and db[45] < -100
    peak = int(np.argmax(mel[10]))
    assert mel[:28, peak].min() > mel[32:, peak].max() + 1.0  # the tone stops at 1 s = frame 30
    from whisper.audio import mel_filters

    centre = int(np.argmax(mel_filters("cpu", 80).numpy()[:, int(1000 / (SR / 400))]))
    assert abs(peak - centre) <= 1


def test_lip_sync_proxy_prefers_matching_motion():
    rng = np.random.default_rng(0)
    level = np.convolve(rng.normal(size=300), np.ones(5) / 5, "same")
    mouth = 0.1 + 0.02 * np.roll(level, 2) + 0.002 * rng.normal(size=300)
    assert lip_sync_proxy(mouth, level) > 0.8
    assert lip_sync_proxy(rng.permutation(mouth), level) < 0.4


def _espeak_audio(tmp_path, text, voice="en-us+f2"):
    from extractors.media import decode_audio

    wav = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-g", "8", "-w", str(wav), text], check=True)
    return decode_audio(str(wav))


def test_whisper_checkpoint_round_trips(tmp_path, monkeypatch):
    import whisper
    from whisper.model import ModelDimensions, Whisper

    from extractors.transcribe import WhisperTranscriber, make_transcriber, resolve_whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                           n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)
    torch.manual_seed(0)
    model = Whisper(dims)
    with torch.no_grad():  # whisper leaves this one as torch.empty: uninitialised memory, NaN at times (CI)
        model.decoder.positional_embedding.normal_(0.0, 0.02)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    path = tmp_path / "tiny-random.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    loaded = whisper.load_model(str(path), device="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    monkeypatch.setenv("WHISPER_CACHE", str(tmp_path))
    assert resolve_whisper("tiny-random") == ("pt", str(path)) and resolve_whisper("large-v3") is None
    assert resolve_whisper(str(path)) == ("pt", str(path))
    tr = make_transcriber("tiny-random")
    assert isinstance(tr, WhisperTranscriber) and tr.engine.startswith("whisper:")
    for k, v in model.state_dict().items():  # read with weights_only, the same weights as whisper's loader
        assert torch.equal(v, tr.model.state_dict()[k])
    audio = _espeak_audio(tmp_path, "hello world")
    out = tr(audio, language="en")  # random weights: any text, but the full decode path runs
    assert out.engine == tr.engine and out.language == "en" and isinstance(out.text, str)
    assert all(w["start_s"] <= w["end_s"] for w in out.words)


def test_pocketsphinx_fallback_transcribes_english(tmp_path):
    from extractors.transcribe import SphinxTranscriber, make_transcriber

    assert isinstance(make_transcriber("no-such-whisper"), SphinxTranscriber)
    digits = "one two three four five six seven eight nine ten"
    audio = _espeak_audio(tmp_path, digits)
    out = SphinxTranscriber()(audio)
    assert len(set(out.text.split()) & set(digits.split())) >= 4, out.text  # synthetic voice: most digits heard
    assert out.words and all(0 <= w["start_s"] < w["end_s"] <= len(audio) / SR + 0.05 for w in out.words)


def test_tables_reproduce_the_training_geometry(real_run):
    from pipelines.gnpfa import dataset_training_arrays

    out, _ = real_run
    from_parts, _ = _real_training_data(out)
    ok = set(open_dataset(out).query("select clip_id from clip_features where status = 'ok'").column(0).to_pylist())
    full = {k: v for k, v in training_arrays(  # the tables hold the clips extraction kept
        [f for js in sorted((out / "parts" / "extract").glob("*.json"))
         for f in features_from_npz(str(js.with_suffix(".npz")), json.loads(js.read_text())["clips"])
         if f.clip_id in ok]).items()}
    from_tables = dataset_training_arrays(out)
    assert from_tables["offsets"].shape == full["offsets"].shape
    assert np.abs(from_tables["offsets"] - full["offsets"]).max() < 1e-3  # float32 storage of landmarks/pose
    assert np.array_equal(from_tables["crops"], full["crops"])


def test_train_commands_and_a_provided_checkpoint(real_run, real_dir, tmp_path):
    import sys

    out, _ = real_run
    repo = Path(__file__).resolve().parents[1]
    m2fd = [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    kw = dict(capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    # the same command twice: the same weights (fixed seed and threads). One thread: at 2 threads the second
    # of two runs came out different in the last bits twice in ~8 suites (same data digest; not reproduced
    # in 26 standalone repeats), so the repeat is checked where the arithmetic has no thread split at all
    for geo in ("geo", "geo2"):
        r = subprocess.run(m2fd + ["gnpfa", "train-geometry", str(out), "--out", str(tmp_path / geo), "--steps", "60",
                                   "--hidden", "128", "--max-frames", "300", "--threads", "1"], **kw)
        assert r.returncode == 0, r.stderr[-2000:]
    geo_meta = [json.loads((tmp_path / g / "config.json").read_text()) for g in ("geo", "geo2")]
    # the same training data (by digest), then the same arithmetic: the same weights
    assert len({m["recipe"]["data_sha256"] for m in geo_meta}) == 1
    geo_sha = {m["sha256"] for m in geo_meta}
    assert len(geo_sha) == 1
    r = subprocess.run(m2fd + ["gnpfa", "train-image", str(out), "--geometry", str(tmp_path / "geo"), "--out",
                               str(tmp_path / "ck"), "--steps", "20", "--enc-width", "8", "--max-frames", "300",
                               "--half"], **kw)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    sha = meta["sha256"]
    # the recipe: every input with its sha256, the extraction config, the code, both trainings
    srcs = {r["sha256"] for r in open_dataset(out).table("sources").to_pylist()}
    rec = meta["recipe"]
    assert {s["sha256"] for s in rec["inputs"][0]["sources"]} == srcs and rec["inputs"][0]["extract_config"]
    assert rec["code"]["package"] and rec["geometry"]["sha256"] in geo_sha and rec["image"]["steps"] == 20
    assert rec["data_sha256"] == geo_meta[0]["recipe"]["data_sha256"]  # the same seeded sample of frames
    assert 200 <= meta["trained_on_frames"] <= 400 and meta["weights_dtype"] == "float16"
    r = subprocess.run(m2fd + ["run", str(real_dir / "d12.mp4"), "--out", str(tmp_path / "D"), "--executor", "local",
                               "--stages", "ingest,extract", "--set", f"gnpfa_checkpoint={tmp_path / 'ck'}"], **kw)
    assert r.returncode == 0, r.stderr[-2000:]
    ds = open_dataset(tmp_path / "D")
    assert set(ds.table("clip_features").column("gnpfa_checkpoint").to_pylist()) == {sha}
    card = json.loads((tmp_path / "D" / "dataset.json").read_text())
    assert card["lineage"]["checkpoints"]["gnpfa"] == {"sha256": sha, "kind": "provided", "path": str(tmp_path / "ck")}
    assert not (tmp_path / "D" / "models").exists()  # nothing bootstrapped


def test_checkpoint_bytes_are_deterministic(tmp_path):
    """Identical weights must give identical files (the sha256 identifies the checkpoint)."""
    import subprocess

    code = ("import sys, torch; from models.gnpfa import GNPFAConfig, GeometryVAE, ImageEncoder, save_checkpoint;"
            "torch.manual_seed(0); c = GNPFAConfig(hidden=32, enc_width=4);"
            "print(save_checkpoint(sys.argv[1], c, GeometryVAE(c), ImageEncoder(c)))")
    repo = Path(__file__).resolve().parents[1]
    shas = []
    for i in range(3):  # separate processes (other hash seeds): hash-map ordering differs between them
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"c{i}")], capture_output=True, text=True,
                           cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "PYTHONHASHSEED": str(i)}, check=True)
        shas.append(r.stdout.strip())
    assert len(set(shas)) == 1
    assert len({(tmp_path / f"c{i}" / "model.safetensors").read_bytes() for i in range(3)}) == 1


def test_crop_size_follows_a_provided_gnpfa_checkpoint(tmp_path):
    """Crops are cut at the size the provided checkpoint's image encoders take; a folder that is not a
    checkpoint is a clear error before any work starts. Config parsing itself reads no files (a
    cluster's checkpoint path need not exist where a job's config is checked)."""
    from extractors.config import ExtractConfig
    from models.gnpfa import GeometryVAE, GNPFAConfig, ImageEncoder, save_checkpoint
    from pipelines.gnpfa import crops_for_checkpoint

    g = GNPFAConfig(hidden=32, crop_size=32, enc_width=4)
    save_checkpoint(tmp_path / "ck", g, GeometryVAE(g), ImageEncoder(g))
    assert crops_for_checkpoint(ExtractConfig(gnpfa_checkpoint="bootstrap")).crop_size == ExtractConfig().crop_size == 64
    assert crops_for_checkpoint(ExtractConfig()).crop_size == 128  # the shipped GNPFA's
    for explicit in ({}, {"crop_size": 64}, {"crop_size": 32}):
        cfg = ExtractConfig.from_dict({"gnpfa_checkpoint": str(tmp_path / "ck"), **explicit})
        assert crops_for_checkpoint(cfg).crop_size == 32
    missing = ExtractConfig.from_dict({"gnpfa_checkpoint": str(tmp_path / "nothing")})  # parsing reads nothing
    with pytest.raises(ValueError, match="no config.json"):
        crops_for_checkpoint(missing)
