"""spatialthinker-eval: measuring a deployment's accuracy on multiple-choice spatial questions.

data.py reads benchmark files and the project's JSONL (recordings.py: frames from rosbag2 recordings; errors.py:
the error of a row that cannot be asked), runner.py asks every row through an Answerer and appends
predictions.jsonl, scoring.py turns predictions into summary.json / summary.md and compares two runs,
calibration.py computes calibration metrics and pictures and the `calibrate` files, cli.py is the command.
Everything but node_client.py (the --node path, which asks a running node over ROS) works without ROS.
"""
