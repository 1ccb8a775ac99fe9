"""Fused Triton kernels for S2D: TMA's temporal attention and MCP's spatial gating."""
