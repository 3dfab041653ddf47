"""Versioned Arrow schemas of every M2F-D table.

This module is the single source of field names, dtypes and shapes. Writers validate record
batches against these schemas (see ``storage_schemas.io``); readers read through them.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "0.8.0"  # 0.8.0: clips/clip_features.asd_sync, clip_features.sync_score; 0.7.0: clip_features.av_sync; 0.6.0: frames.face_transform; 0.5.0: transcripts.rejected_s; 0.4.0: frames.blendshapes, clip_features face/voice embeddings, transcripts.model_sha256, speakers, samples.speaker_id; 0.3.0: clips/clip_features.speaking_score, face_tracks; 0.2.0: shards.version, samples.input_digest (dataset versions)
FPS = 30  # every per-frame array in M2F-D is sampled at exactly this rate
AUDIO_SAMPLE_RATE = 16_000

_NULLABLE_NOTE = "nullable"


def _f(name: str, typ: pa.DataType, nullable: bool = False, doc: str = "") -> pa.Field:
    md = {"doc": doc} if doc else None
    return pa.field(name, typ, nullable=nullable, metadata=md)


SOURCES = pa.schema(
    [
        _f("source_id", pa.string(), doc="first 16 hex digits of the content sha256"),
        _f("uri", pa.string(), doc="where the bytes were read from (path or URL)"),
        _f("sha256", pa.string()),
        _f("size_bytes", pa.int64()),
        _f("container", pa.string(), True, "ffprobe format_name"),
        _f("duration_s", pa.float64(), True),
        _f("video_codec", pa.string(), True),
        _f("width", pa.int32(), True, "display width after rotation"),
        _f("height", pa.int32(), True, "display height after rotation"),
        _f("rotation", pa.int32(), True, "clockwise degrees applied to decoded frames"),
        _f("fps_declared", pa.float64(), True, "average frame rate from the container"),
        _f("vfr", pa.bool_(), True, "variable frame rate detected from timestamps"),
        _f("n_frames_src", pa.int64(), True),
        _f("audio_codec", pa.string(), True),
        _f("audio_sample_rate", pa.int32(), True),
        _f("audio_channels", pa.int32(), True),
        _f("status", pa.string(), doc="'ok' (yielded clips) or 'quarantined'"),
        _f("n_clips", pa.int32()),
        _f("speech_s", pa.float64(), True, "seconds of speech found by the VAD"),
    ]
)

CLIPS = pa.schema(
    [
        _f("clip_id", pa.string(), doc="<source_id>-<start_frame:06d>, stable for a source and config"),
        _f("source_id", pa.string()),
        _f("uri", pa.string()),
        _f("start_s", pa.float64(), doc="clip start on the source timeline (seconds)"),
        _f("end_s", pa.float64(), doc="clip end (exclusive)"),
        _f("start_frame", pa.int64(), doc="index on the 30 fps output grid"),
        _f("n_frames", pa.int64(), doc="frames on the 30 fps grid"),
        _f("duration_s", pa.float64()),
        _f("fps", pa.int32(), doc="always storage_schemas.FPS"),
        _f("speech_ratio", pa.float32(), doc="fraction of the clip the VAD marks as speech"),
        _f("face_ratio", pa.float32(), doc="fraction of analysed frames with the tracked speaker visible"),
        _f("face_track_id", pa.int32()),
        _f("face_box", pa.list_(pa.float32(), 4), doc="median speaker box [x0,y0,x1,y1], normalised"),
        _f("face_size_px", pa.float32(), doc="median speaker face width in display pixels"),
        _f("face_score", pa.float32(), doc="median detector confidence"),
        _f("n_other_faces", pa.int32(), doc="distinct non-speaker (background) face tracks in the clip"),
        _f("speaking_score", pa.float32(), True, "mean Light-ASD speaking logit of the clip's face over the clip "
                                                 "(>= 0: speaking); null where active-speaker detection is off"),
        _f("asd_sync", pa.float32(), True, "ASD-sync (models/asd_sync.py) of the clip's face over the clip: mean "
           "correlation of its Light-ASD visual embedding predicted from the speech with the observed one, best lag "
           "within +-2 frames (25 fps); null where the sync model is off or the clip too short"),
        _f("width", pa.int32()),
        _f("height", pa.int32()),
        _f("rotation", pa.int32()),
    ]
)

QUARANTINE = pa.schema(
    [
        _f("uri", pa.string()),
        _f("source_id", pa.string(), True, "null when the bytes could not be read"),
        _f("stage", pa.string(), doc="pipeline stage that rejected the input"),
        _f("reason", pa.string(), doc="one of storage_schemas.vocab.QUARANTINE_REASONS"),
        _f("message", pa.string(), doc="human explanation with specifics"),
        _f("detail", pa.string(), True, "JSON with measured values behind the decision"),
        _f("clip_id", pa.string(), True, "set when one clip (not the whole input) was rejected"),
    ]
)

N_LANDMARKS = 478
N_MELS = 80
N_BLENDSHAPES = 52
FACE_EMBEDDING_DIM = 128
VOICE_EMBEDDING_DIM = 256

# Per-frame extraction, one Parquet part per source under tables/frames/.
FRAMES = pa.schema(
    [
        _f("clip_id", pa.string()),
        _f("frame", pa.int32(), doc="index on the clip's 30 fps grid"),
        _f("t_s", pa.float64(), doc="time on the source timeline"),
        _f("tracked", pa.bool_(), doc="false where Face Mesh lost the speaker (pose/landmark fields are then null)"),
        _f("landmarks", pa.list_(pa.float32(), N_LANDMARKS * 3), True,
           "MediaPipe Face Mesh 478x3 (x, y image-normalised; z in x's scale), row-major"),
        _f("landmark_conf", pa.float32(), doc="exp(-(rms of stable points off the clip's neutral / 0.03 IOD)^2)"),
        _f("rotation", pa.list_(pa.float32(), 9), True, "head rotation (mesh path), row-major 3x3"),
        _f("translation", pa.list_(pa.float32(), 3), True, "pixels, display frame"),
        _f("scale", pa.float32(), True, "pixels per template unit (inter-ocular distance)"),
        _f("yaw", pa.float32(), True, "degrees"),
        _f("pitch", pa.float32(), True, "degrees"),
        _f("roll", pa.float32(), True, "degrees"),
        _f("mouth_open", pa.float32(), True, "inner-lip gap, IOD units"),
        _f("gnpfa_z", pa.list_(pa.float32()), True, "GNPFA expression latent (VAE posterior mean of the mesh path)"),
        _f("gnpfa_recon_err", pa.float32(), True, "mean vertex error of the VAE round trip, % of IOD"),
        _f("image_z", pa.list_(pa.float32()), True, "GNPFA latent from the image encoder (face crop)"),
        _f("image_rotation", pa.list_(pa.float32(), 9), True, "head rotation from the image pose encoder"),
        _f("audio_mel", pa.list_(pa.float32(), N_MELS), doc="Whisper 80-bin log-mel, mean over the frame's 1/30 s"),
        _f("audio_db", pa.float32(), doc="RMS level over the frame's 1/30 s, dBFS"),
        _f("blendshapes", pa.list_(pa.float32(), N_BLENDSHAPES), True,
           "52 ARKit blendshape weights (names: storage_schemas.vocab.BLENDSHAPES), MediaPipe's face_blendshapes "
           "model on this frame's landmarks; null where untracked"),
        _f("face_transform", pa.list_(pa.float32(), 16), True,
           "MediaPipe's facial transformation matrix (the FaceLandmarker's geometry pipeline on this frame's "
           "landmarks), row-major 4x4: canonical face model (cm; y up, z towards the camera) to camera space "
           "(63 deg vertical field of view; rotation times scale, then translation); null where untracked"),
    ]
)

CLIP_FEATURES = pa.schema(
    [
        _f("clip_id", pa.string()),
        _f("source_id", pa.string()),
        _f("status", pa.string(), doc="'ok' or 'dropped' (reason in drop_reason and the quarantine table)"),
        _f("drop_reason", pa.string(), True),
        _f("n_frames", pa.int32()),
        _f("tracked_ratio", pa.float32()),
        _f("landmark_conf", pa.float32(), doc="mean over tracked frames"),
        _f("jitter", pa.float32(), True, "mean |second difference| of the normalised mesh, IOD/frame^2"),
        _f("lip_sync", pa.float32(), True, "best correlation (+-3 frames) of mouth opening with speech level"),
        _f("speaking_score", pa.float32(), True, "the clip's Light-ASD speaking score (clips.speaking_score)"),
        _f("av_sync", pa.float32(), True, "AV-sync score (models/av_sync.py): mean correlation of the mouth motion "
           "predicted from the speech with the observed one, best lag within +-3 frames; null if off or too short"),
        _f("asd_sync", pa.float32(), True, "the clip's ASD-sync (clips.asd_sync)"),
        _f("sync_score", pa.float32(), True, "av_sync + asd_sync: does this face say what is heard (dubbing, "
           "voice-over and another person's speech score low); null where either is"),
        _f("recon_err", pa.float32(), True, "mean GNPFA round-trip error, % IOD"),
        _f("image_pose_err_deg", pa.float32(), True, "image vs mesh head rotation, mean geodesic degrees"),
        _f("image_latent_rel_err", pa.float32(), True, "|z_image - z_mesh| / |z_mesh|, mean"),
        _f("neutral", pa.list_(pa.float32(), N_LANDMARKS * 3), True, "speaker's neutral geometry, template frame"),
        _f("gnpfa_checkpoint", pa.string(), doc="sha256 of the GNPFA weights used"),
        _f("transcript_engine", pa.string(), True, "the transcripts row's engine; null: not transcribed (a dropped clip)"),
        _f("face_embedding", pa.list_(pa.float32(), FACE_EMBEDDING_DIM), True,
           "SFace identity embedding (L2-normalised mean over identity_frames probe frames); null if none tracked"),
        _f("voice_embedding", pa.list_(pa.float32(), VOICE_EMBEDDING_DIM), True,
           "speaker-encoder (Resemblyzer GE2E) embedding of the clip's audio, L2-normalised"),
    ]
)

# One row per clip given an identity (the shard stage): committed rows never change; a new clip joins the
# speaker whose face centroid it matches or founds a new one (extractors.identity.assign_speakers).
SPEAKERS = pa.schema(
    [
        _f("clip_id", pa.string()),
        _f("speaker_id", pa.string(), doc="spk-<sha256 of the founding clip_id, 12 hex>"),
        _f("split", pa.string(), doc="the speaker's split (every clip of a speaker is in it)"),
        _f("method", pa.string(), doc="'new' (founded a speaker), 'face' or 'voice' (joined by that embedding)"),
        _f("face_sim", pa.float32(), True, "best cosine to an earlier speaker's face centroid"),
        _f("voice_sim", pa.float32(), True, "best cosine to an earlier speaker's voice centroid"),
        _f("version", pa.int32(), doc="dataset version of the run that assigned it"),
        _f("rule", pa.string(), doc="assignment rule and thresholds (extractors.identity.SpeakerRule)"),
    ]
)

# One row per face track of a source that ingest scored with active-speaker detection (Light-ASD).
FACE_TRACKS = pa.schema(
    [
        _f("source_id", pa.string()),
        _f("track_id", pa.int32(), doc="the tracker's id (clips.face_track_id)"),
        _f("start_s", pa.float64(), doc="time of the first score on the source timeline"),
        _f("asd_fps", pa.int32(), doc="rate of speaking_score (25, Light-ASD's)"),
        _f("face_size_px", pa.float32(), doc="median face width in display pixels"),
        _f("speaking_score", pa.list_(pa.float32()), doc="per-frame speaking logit at asd_fps from start_s "
                                                         "(>= 0: speaking; NaN where the track was not detected)"),
        _f("speaker", pa.bool_(), doc="the track is the face of at least one clip"),
    ]
)

TRANSCRIPTS = pa.schema(
    [
        _f("clip_id", pa.string()),
        _f("engine", pa.string(), doc="faster-whisper:<model>:<sha16>, whisper:<sha16> or pocketsphinx:<version>"),
        _f("language", pa.string(), True),
        _f("text", pa.string()),
        _f(
            "words",
            pa.list_(pa.struct([("word", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64())])),
        ),
        _f("model_sha256", pa.string(), True, "sha256 of the ASR weights (null: pocketsphinx's bundled model)"),
        _f("rejected_s", pa.float64(), True, "seconds of decoded segments left out as repetition loops (gzip "
           "compression ratio above extract.asr_max_compression_ratio); null: an engine without the check"),
    ]
)

# Long format: one row per (clip, labeler, field). The wide `labels` view (storage_schemas.dataset)
# shows, per clip and field, the value of the most recent labeler run.
LABEL_ROWS = pa.schema(
    [
        _f("clip_id", pa.string()),
        _f("labeler", pa.string(), doc="labeler name (storage_schemas.vocab.LABEL_FIELDS lists the fields)"),
        _f("labeler_version", pa.string()),
        _f("field", pa.string()),
        _f("value", pa.string(), doc="JSON text"),
        _f("confidence", pa.float32(), True),
        _f("run", pa.int32(), doc="0 = labels of `m2fd run`; each `m2fd relabel` adds 1"),
    ]
)

SHARDS = pa.schema(
    [
        _f("shard", pa.string(), doc="path relative to the dataset root"),
        _f("split", pa.string()),
        _f("version", pa.int32(), doc="dataset version that added the shard; committed shards never change"),
        _f("sha256", pa.string()),
        _f("n_samples", pa.int32()),
        _f("bytes", pa.int64()),
    ]
)

SAMPLES = pa.schema(
    [
        _f("clip_id", pa.string(), doc="the sample key in its shard"),
        _f("split", pa.string()),
        _f("shard", pa.string()),
        _f("index_in_shard", pa.int32()),
        _f("n_frames", pa.int32()),
        _f("bytes", pa.int64(), doc="sum of the sample's member sizes"),
        _f("input_digest", pa.string(), doc="sha256 of the rows the sample was built from (clip, features, "
                                            "labels, transcript, shard config): a changed input is detected"),
        _f("speaker_id", pa.string(), doc="the clip's speaker (speakers table); splits go by speaker"),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "sources": SOURCES,
    "clips": CLIPS,
    "quarantine": QUARANTINE,
    "frames": FRAMES,
    "clip_features": CLIP_FEATURES,
    "face_tracks": FACE_TRACKS,
    "transcripts": TRANSCRIPTS,
    "speakers": SPEAKERS,
    "label_rows": LABEL_ROWS,
    "shards": SHARDS,
    "samples": SAMPLES,
}
# Tables written by the stages that exist now; the others are planned.
ACTIVE_TABLES = ("sources", "clips", "quarantine", "face_tracks", "frames", "clip_features", "transcripts", "label_rows",
                 "speakers", "shards", "samples")
# Tables stored as a folder of Parquet parts (one per source) rather than one file.
PARTITIONED = ("frames",)

# Columns that a table's SQL view (Dataset.query / connect) adds from another table, joined by clip_id:
# {table: {column: (from table, type, doc)}}. Table files and Dataset.table() hold the table's own columns.
VIEW_COLUMNS = {
    "clips": {"speaker_id": ("speakers", pa.string(),
                             "the clip's speaker (speakers table; assigned by the shard stage, null before)")},
}
# the clips table's own columns as `c.<name>, ...` (stages key their parts by a clip's own fields only)
CLIP_COLUMNS = ", ".join(f"c.{n}" for n in CLIPS.names)
