"""Tasks: task folders and their templates, contrast rendering, the conversation and chat formats."""
