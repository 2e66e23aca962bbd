"""What the node tests ask, and what the replay backend answers them (the fixtures are in conftest.py)."""

from spatialthinker_ros.srv import AskSpatial

E = AskSpatial.Response
CALL = 30.0
STARTUP = 60.0
QUESTION = "Is the cup left or right of the plate?"
OPTIONS = ["left of", "right of"]
# Boxes in the pixels of the image the model is given: 320x240 (640x480 frames, max_input_pixels 76800).
RESPONSE = (
    "<observe>A cup and a plate on a table.</observe>\n"
    '<scene>{"objects": [{"id": "cup.1", "bbox": [50, 50, 100, 100]}, {"id": "plate.1", "bbox": [150, 100, 250, 200]}],'
    ' "relationships": [{"subject": "cup.1", "predicate": "left of", "object": "plate.1"}]}</scene>\n'
    "<think>The cup's box is left of the plate's box.</think>\n<answer>(A) left of</answer>")


def replay_params(replay_file, **extra):
    """Node parameters for the replay backend. No frame age limit unless a test is about it: a loaded machine can
    hold up the test's camera thread past the node's 1 s default."""
    params = dict(backend="replay", replay_file=str(replay_file), max_input_pixels=320 * 240, max_image_age=0.0)
    params.update(extra)
    return params
