"""The Gradio chat front end: it uses the gateway like any OpenAI client."""
