"""spatialthinker_mcp: the node's perception as MCP tools for LLM agent hosts (docs/agents.md). results.py shapes
what the tools return (ROS-free); node_link.py is the ROS 2 client of the node; server.py the MCP server."""
