"""`sdfast serve`: an HTTP backend speaking the AUTOMATIC1111 and OpenAI images APIs over one shared engine."""
