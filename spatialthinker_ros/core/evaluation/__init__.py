"""Measuring a deployment's accuracy on multiple-choice spatial questions (spatialthinker-eval), ROS-free.

data.py reads benchmark files and the project's JSONL (recordings.py: frames from rosbag2 recordings),
runner.py asks every row through an Answerer and appends predictions.jsonl, scoring.py turns predictions
into summary.json / summary.md and compares two runs. The ROS path (--node) lives in ros/eval_client.py.
"""
