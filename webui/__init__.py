"""The Gradio chat front end (to come): it uses the gateway like any OpenAI client."""
