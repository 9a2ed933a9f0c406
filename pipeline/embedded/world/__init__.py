"""A procedurally drawn world for a tiny InternVL that can be checked for meaning (pure functions, seeded).

The contract (what the trained tiny model in pipeline/embedded sees, and what tests may rely on):

- One solid, filled shape per image: a circle, an axis-aligned square, or an isosceles triangle with its base
  horizontal, pointing up or down. Shape colours: red (220, 30, 30), green (40, 180, 60), blue (40, 70, 220),
  yellow (235, 215, 40); backgrounds: white (245), black (15), gray (128). Each channel varies by up to +-25 (shape) /
  +-12 (background); per-pixel Gaussian noise of sigma 0-8 is added.
- The shape's bounding box spans 25-70% of the image's shorter side and lies fully inside the image.
- Images are 160-2400 px per side, aspect 1:4 to 4:1 (1 to 12 grid tiles plus the thumbnail), JPEG (quality 60-95)
  or PNG.
- Videos are 2-10 s at 10-30 fps, 160-1280 px per side (even sizes, aspect 1:2 to 2:1), H.264 (yuv420p) in mp4: one
  shape of one colour on one background moves in a straight line (left, right, up or down) at constant speed across at
  least a third of the frame, staying fully inside it.
- Answers are exact lower-case strings without a final period (`image_answers`, `pair_answers`, `video_answers`);
  the yes/no prompts (`image_yes_no`) are for the score task, labels yes/no.

Everything is a function of a `numpy.random.Generator` (or of a spec drawn from one): the same seed draws the same
bytes. Nothing here imports torch. `from pipeline.embedded import world as W` is the usual door: what a picture
shows and how it is drawn in `scene`, images and pairs in `images`, videos in `videos`.
"""

from pipeline.embedded.world.images import (
    TILE_COUNTS,
    DrawnImage,
    DrawnPair,
    draw_image,
    draw_pair,
    encode_image,
    image_answers,
    image_yes_no,
    pair_answers,
    size_with_tiles,
    tiles_for,
)
from pipeline.embedded.world.scene import (
    BACKGROUNDS,
    CAPTION,
    COLORS,
    DIRECTIONS,
    IMAGE_SIDES,
    SHAPES,
    VIDEO_CAPTION,
    VIDEO_SIDES,
    WHAT_BACKGROUND,
    WHAT_COLOR,
    WHAT_SHAPE,
    WHICH_WAY,
    Box,
    Scene,
    inside,
    is_color,
    is_there,
    render,
    sample_scene,
    sample_size,
    which_image,
)
from pipeline.embedded.world.videos import (
    DrawnVideo,
    VideoSpec,
    draw_video,
    encode_video,
    sample_video_spec,
    video_answers,
)

__all__ = [
    "BACKGROUNDS", "Box", "CAPTION", "COLORS", "DIRECTIONS", "DrawnImage", "DrawnPair", "DrawnVideo", "IMAGE_SIDES",
    "SHAPES", "Scene", "TILE_COUNTS", "VIDEO_CAPTION", "VIDEO_SIDES", "VideoSpec", "WHAT_BACKGROUND", "WHAT_COLOR",
    "WHAT_SHAPE", "WHICH_WAY", "draw_image", "draw_pair", "draw_video", "encode_image", "encode_video",
    "image_answers", "image_yes_no", "inside", "is_color", "is_there", "pair_answers", "render", "sample_scene",
    "sample_size", "sample_video_spec", "size_with_tiles", "tiles_for", "video_answers", "which_image",
]
