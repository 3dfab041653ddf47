"""Face-mesh regions (MediaPipe 478-point topology) used by evaluation metrics.

LIPS: the vertices of MediaPipe's FACEMESH_LIPS contours (lip vertex error, LVE);
UPPER_FACE: eyes and eyebrows (upper-face dynamics deviation, FDD). tests/test_train.py checks
them against mediapipe's connection sets."""

LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270,
        291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)
UPPER_FACE = (7, 33, 46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161,
              163, 173, 246, 249, 263, 276, 282, 283, 285, 293, 295, 296, 300, 334, 336, 362, 373, 374, 380, 381, 382,
              384, 385, 386, 387, 388, 390, 398, 466)
