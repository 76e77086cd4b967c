"""Agents that run inside the server: the built-in ``echo`` agent."""
