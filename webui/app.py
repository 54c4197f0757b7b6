"""The Gradio chat page: `create_app(settings)` builds it, `create_server` serves it with /health.

Handlers are async and short: the conversation logic is in `webui.chat`, the running turns in
`webui.turns`, the log in `webui.feedback`. The committed history lives in a per-session
`gr.State`; the chatbot shows it, plus the answer while it streams.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import gradio as gr
from fastapi import FastAPI
from openai import AsyncOpenAI, DefaultAsyncHttpxClient, Timeout

from webui import chat
from webui.chat import Message, Params
from webui.feedback import FeedbackLog
from webui.settings import WebUISettings
from webui.turns import Turns

logger = logging.getLogger(__name__)

# System fonts: the default theme would fetch Google Fonts, which offline machines cannot reach.
_THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)
_CSS = """
#status p { margin: 0; }
#status.error { color: var(--error-text-color); background: var(--error-background-fill);
                border: 1px solid var(--error-border-color); border-radius: var(--radius-md);
                padding: 6px 10px; }
"""


def make_client(settings: WebUISettings) -> AsyncOpenAI:
    key = settings.api_key.get_secret_value() if settings.api_key else "no-key"
    # With a CA file, the gateway's certificate is verified against it; else the system's CAs.
    http_client = DefaultAsyncHttpxClient(verify=settings.ssl_context()) \
        if settings.ssl_ca_file else None
    return AsyncOpenAI(
        base_url=settings.api_base, api_key=key, max_retries=settings.max_retries,
        timeout=Timeout(settings.timeout, connect=settings.connect_timeout),
        http_client=http_client,
    )


def _note(text: str = "") -> Any:
    """The status line under the chat: progress in italics, or nothing."""
    return gr.update(value=f"*{text}*" if text else "", elem_classes=[])


def _error(text: str) -> Any:
    # U+26A0 without the emoji selector: plain fonts have it, emoji fonts are often missing.
    return gr.update(value=f"⚠ {text}", elem_classes=["error"])


def create_app(settings: WebUISettings, client: AsyncOpenAI | None = None) -> gr.Blocks:
    client = client or make_client(settings)
    turns = Turns()
    log = FeedbackLog(settings.log_dir) if settings.log_dir else None

    def describe(exc: BaseException, model: str | None) -> Any:
        return _error(chat.describe_error(exc, model=model, gateway_url=settings.gateway_url))

    async def refresh_models(current: str | None) -> tuple[Any, Any]:
        try:
            served = await chat.list_models(client)
        except Exception as exc:  # each failure becomes a message; the page stays usable
            logger.warning("listing models failed error=%s", exc)
            return gr.update(), describe(exc, None)
        choices, value = chat.pick_model(current, served)
        note = _note() if served else _error(
            "The gateway serves no model right now (no worker is ready). Press ↻ to check again.")
        return gr.update(choices=choices, value=value), note

    async def new_conversation(request: gr.Request) -> tuple[list[Message], list[Message], Any,
                                                              str]:
        # A turn still streaming must not write its answer into the new conversation.
        await turns.stop(request.session_hash or "", discard=True, wait=10)
        return [], [], _note(), uuid.uuid4().hex

    async def answer(
        request: gr.Request, base: list[Message], text: str, model: str | None, system: str,
        params: Params, conversation_id: str, *, keep: list[Message], restore: str,
    ) -> AsyncGenerator[dict[Any, Any], None]:
        """Stream one answer to `text` after `base`; commit it to the history when it ends.

        When the turn fails or is stopped before its first word, the history stays `keep`, and
        `restore` goes back into the message box.
        """
        session = request.session_hash or ""
        if not model:
            yield {status: _error("Choose a model first (press ↻ if the list is empty).")}
            return
        turn = turns.begin(session)
        if turn is None:
            yield {status: _error("An answer is still being written: wait, or press Stop.")}
            return
        messages = chat.request_messages(system, base, text)
        shown = [*base, chat.user(text)]
        reply = ""
        try:
            yield {chatbot: [*shown, chat.assistant("")], textbox: "",
                   status: _note("Generating…")}
            # aclosing: if the browser goes away, Gradio closes us, and we close the request.
            async with aclosing(chat.stream_answer(client, model, messages, params,
                                                   turn.stop)) as pieces:
                async for piece in pieces:
                    reply += piece
                    yield {chatbot: [*shown, chat.assistant(reply)]}
        except Exception as exc:
            logger.warning("chat failed model=%s error=%s", model, type(exc).__name__)
            if not turn.discard:
                yield {chatbot: keep, history: keep, textbox: restore,
                       status: describe(exc, model)}
            return
        finally:
            turns.end(session, turn)
        if turn.discard:
            return
        stopped = turn.stop.is_set()
        if stopped and not reply:
            yield {chatbot: keep, history: keep, textbox: restore,
                   status: _note("Stopped before the answer began.")}
            return
        committed = chat.with_answer(base, text, reply)
        yield {chatbot: committed, history: committed,
               status: _note("Stopped." if stopped else "")}
        if log is not None:
            await log.turn(conversation_id=conversation_id, model=model, params=params,
                           system_prompt=system, conversation=committed,
                           outcome="stopped" if stopped else "complete")

    async def send(
        text: str, base: list[Message], model: str | None, system: str, temperature: float,
        top_p: float, max_tokens: float, conversation_id: str, request: gr.Request,
    ) -> AsyncIterator[dict[Any, Any]]:
        if not text.strip():
            return
        params = Params(temperature, top_p, int(max_tokens))
        async with aclosing(answer(request, base, text, model, system, params, conversation_id,
                                   keep=base, restore=text)) as updates:
            async for update in updates:
                yield update

    async def regenerate(
        base: list[Message], model: str | None, system: str, temperature: float, top_p: float,
        max_tokens: float, conversation_id: str, request: gr.Request,
    ) -> AsyncIterator[dict[Any, Any]]:
        try:
            before, text = chat.regenerate_split(base)
        except chat.NothingToRegenerate as exc:
            yield {status: _error(str(exc))}
            return
        params = Params(temperature, top_p, int(max_tokens))
        # Until the new answer is committed, the history keeps the old one: a failed or empty
        # regeneration changes nothing.
        async with aclosing(answer(request, before, text, model, system, params,
                                   conversation_id, keep=base, restore="")) as updates:
            async for update in updates:
                yield update

    async def stop(request: gr.Request) -> None:
        await turns.stop(request.session_hash or "")

    async def rate(
        data: gr.LikeData, base: list[Message], model: str | None, system: str,
        temperature: float, top_p: float, max_tokens: float, conversation_id: str,
    ) -> None:
        if log is None:  # not listened to without a log
            return
        if isinstance(data.liked, bool):
            rating = "like" if data.liked else "dislike"
        else:
            rating = str(data.liked).lower()
        index = data.index if isinstance(data.index, int) else data.index[0]
        await log.feedback(conversation_id=conversation_id, model=model,
                           params=Params(temperature, top_p, int(max_tokens)),
                           system_prompt=system, conversation=chat.copy_history(base),
                           index=index, rating=rating)

    with gr.Blocks(title=settings.title, analytics_enabled=False, fill_height=True) as demo:
        history = gr.State([])
        conversation = gr.State("")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    model = gr.Dropdown(label="Model", choices=[], value=None, elem_id="model",
                                        interactive=True, scale=5)
                    refresh = gr.Button("↻ Refresh", elem_id="refresh", scale=1, min_width=90)
                chatbot = gr.Chatbot(
                    elem_id="chatbot", show_label=False, height=520, layout="bubble",
                    feedback_options=("Like", "Dislike", "Flag") if log else None,
                    buttons=["copy"], placeholder=f"Chat with the models behind "
                    f"**{settings.gateway_url}**.",
                )
                status = gr.Markdown("", elem_id="status")
                with gr.Row(equal_height=False):
                    textbox = gr.Textbox(placeholder="Type a message, Enter to send",
                                         show_label=False, elem_id="message", scale=6,
                                         autofocus=True, max_lines=8, container=False)
                    send_button = gr.Button("Send", variant="primary", elem_id="send",
                                            scale=1, min_width=80)
                    stop_button = gr.Button("■ Stop", variant="stop", elem_id="stop",
                                            scale=1, min_width=80)
                with gr.Row():
                    regenerate_button = gr.Button("Regenerate", elem_id="regenerate",
                                                  size="sm")
                    clear_button = gr.Button("Clear", elem_id="clear", size="sm")
            with gr.Column(scale=1, min_width=240):
                system = gr.Textbox(settings.system_prompt, label="System prompt", lines=4,
                                    elem_id="system-prompt")
                temperature = gr.Slider(0, 2, value=settings.temperature, step=0.05,
                                        label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.01, 1, value=settings.top_p, step=0.01, label="Top p",
                                  elem_id="top-p")
                max_tokens = gr.Slider(1, settings.max_tokens_limit,
                                       value=min(settings.max_tokens, settings.max_tokens_limit),
                                       step=1, label="Max output tokens", elem_id="max-tokens")

        sampling = [system, temperature, top_p, max_tokens, conversation]
        chat_outputs = [chatbot, history, textbox, status]
        demo.load(refresh_models, [model], [model, status])
        demo.load(lambda: uuid.uuid4().hex, None, [conversation])
        refresh.click(refresh_models, [model], [model, status])
        # A model change (by hand, or because its model went away) starts a new conversation;
        # so does the chatbot's own trash icon, which would otherwise empty only the view.
        gr.on([model.change, clear_button.click, chatbot.clear], new_conversation, None,
              [chatbot, history, status, conversation])
        gr.on([textbox.submit, send_button.click], send, [textbox, history, model, *sampling],
              chat_outputs, show_progress="minimal", show_progress_on=[chatbot])
        gr.on([regenerate_button.click, chatbot.retry], regenerate, [history, model, *sampling],
              chat_outputs, show_progress="minimal", show_progress_on=[chatbot])
        stop_button.click(stop, None, None, queue=False)
        # Feedback buttons only where feedback is kept. A like listener is what makes Gradio
        # draw them, and it draws them from `feedback_options`: a listener without options
        # breaks the page's whole chat view (a script error on every update).
        if log is not None:
            chatbot.like(rate, [history, model, *sampling], None)
    demo.queue(default_concurrency_limit=settings.concurrency)
    return demo


def create_server(settings: WebUISettings) -> FastAPI:
    """The page at /, and /health for supervisors and tests."""
    server = FastAPI(title=settings.title, docs_url=None, redoc_url=None, openapi_url=None)

    @server.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return gr.mount_gradio_app(server, create_app(settings), path="/", theme=_THEME, css=_CSS,
                               footer_links=[], run_history=False, show_error=False)
