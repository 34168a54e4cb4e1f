"""The HTTP server: AUTOMATIC1111- and OpenAI-compatible endpoints, jobs with live previews, a web page."""
