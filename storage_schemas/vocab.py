"""Controlled vocabularies shared by writers and readers."""
from __future__ import annotations

# Machine-readable quarantine reasons (stage "ingest" unless noted) and what each means.
QUARANTINE_REASONS: dict[str, str] = {
    "not_a_file": "the input does not exist, is a directory, or is not a regular file",
    "empty_file": "the file has zero bytes",
    "unreadable": "no container/stream could be parsed from the bytes",
    "truncated": "the container or stream ends early (missing index, or far fewer frames than declared)",
    "no_video_stream": "the file has no video stream (audio-only or data-only)",
    "no_audio_stream": "the file has no audio stream, so speech cannot be established",
    "unsupported_codec": "the video codec is not on the configured allow-list or cannot be decoded",
    "decode_error": "the decoder failed on the stream",
    "duplicate": "same bytes (sha256) as another input, which is kept instead",
    "too_short": "the video, or every talking span in it, is shorter than the minimum clip length",
    "silent": "the audio track carries no signal above the silence floor",
    "no_speech": "the audio has signal but the voice-activity detector found no speech",
    "no_face": "no face was detected in any analysed frame",
    "face_too_small": "faces were detected but none reaches the minimum usable size",
    "multiple_faces": "several faces of comparable size are visible and active-speaker detection cannot tell "
                      "which one is speaking (or it is off)",
    "not_speaking": "the clip's face is not the one speaking (Light-ASD speaking score below the threshold): "
                    "a silent face over narration, a listener, a still image (one row per dropped clip)",
    "fetch_error": "the remote URL could not be read",
    "source_changed": "the input's bytes changed (or its local copy vanished) after it was ingested",
    "processing_error": "a stage failed on this input or clip (the message names the stage, step and error); "
                        "the rest of the run went on, and a rerun tries it again",
    # extraction quality (stage "extract", one row per dropped clip)
    "low_tracking": "Face Mesh lost the speaker in too many frames of the clip",
    "low_landmark_conf": "landmarks are inconsistent with the speaker's own rigid shape",
    "jittery": "the normalised mesh shakes more than the configured limit",
    "poor_lip_sync": "mouth opening does not follow the speech level",
    "poor_av_sync": "the mouth does not move as the speech predicts (AV-sync score below the threshold): "
                    "dubbing, a voice-over, another person's speech",
    "poor_sync": "the face does not say what is heard (sync score, AV-sync + ASD-sync, below the threshold): "
                 "dubbing, a voice-over, another person's speech",
}

QUARANTINE_STAGES = ("discover", "ingest", "extract", "label", "shard")


# Label fields and how the wide `labels` view decodes each JSON value.
LABEL_FIELDS: dict[str, str] = {
    "emotion": "string",  # one of EMOTIONS
    "intensity": "string",  # one of INTENSITIES
    "emotion_distribution": "json",  # {class: probability}
    "sentiment": "string",  # positive | neutral | negative
    "sentiment_compound": "double",
    "sentiment_unavailable": "string",  # why sentiment is null (e.g. the transcript's language is not English)
    "speaking_rate_sps": "double",  # syllable nuclei per second of speech
    "words_per_s": "double",
    "pitch_hz": "double",
    "pitch_range_st": "double",
    "energy_db": "double",
    "energy_var_db": "double",
    "head_speed_deg_s": "double",
    "mouth_var": "double",
    "style_tags": "string_list",  # see extractors/labels/style.py for the vocabulary and thresholds
    "caption": "string",
}
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INTENSITIES = ("low", "medium", "high")


# ARKit blendshape names of frames.blendshapes / blendshapes.npy, in MediaPipe's face_blendshapes output
# order (kBlendshapeNames in mediapipe/tasks/cc/vision/face_landmarker/face_blendshapes_graph.cc).
BLENDSHAPES: tuple[str, ...] = (
    "_neutral",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight",
    "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight",
    "eyeWideLeft", "eyeWideRight",
    "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight",
    "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)
