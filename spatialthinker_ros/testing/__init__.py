"""The one harness of the tests, the demo and the benchmarks, by concern:

- isolation:   isolate_ros (an isolated ROS graph for this process and its children), the DDS transport profile
- processes:   child processes stopped by their own pid, the node's command line, bounded polling waits
- fake_cameras: FakeCamera (a driver-like colour + depth + CameraInfo stream), FramePublisher, pattern_image
- node_client: NodeClient (the node's ask service and action, lifecycle, outputs, ~/stats) and the spin waits
- http_server: local HTTP servers scripted as stand-ins of an inference server

Every wait has a deadline and fails with processes.WaitFailed naming what did not arrive (and, when a node
process is known, whether it died and the tail of its log), never by returning None.

Importing isolation, processes or http_server imports no ROS: isolate_ros() must run before rclpy creates its
first context, and the GPU benchmark uses these parts on machines without ROS. fake_cameras and node_client import
rclpy when their classes are built.
"""
