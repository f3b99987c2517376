"""Developer tools for the ChatGLM-6B remote-code package (not loaded by ``trust_remote_code``)."""
