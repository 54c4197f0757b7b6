"""The text fields of a multipart/form-data body (an audio upload's `model`, `stream`, ...).

The gateway routes an upload by its `model` field and relays the body as it came, so it reads
only the parts without a filename, and only the first few KiB of each; file parts are skipped
as they pass. python-multipart does the parsing.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from fleetcore.errors import InvalidRequestError

_MAX_FIELD = 4096


def form_fields(body: bytes, content_type: str) -> dict[str, str]:
    """The form's text fields, by name; 400 for a body that is not multipart/form-data."""
    media, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            "Content-Type must be multipart/form-data with a boundary for this endpoint.",
            param="Content-Type", code="invalid_header")
    fields: dict[str, str] = {}
    name: list[bytes] = []  # the header being read: its name, then its value
    header_value: list[bytes] = []
    headers: dict[bytes, bytes] = {}
    value: list[bytes] = []
    field: list[str] = []  # the text field being read, if the part is one

    def on_part_begin() -> None:
        headers.clear()
        value.clear()
        field.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(name).lower()] = b"".join(header_value)
        name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        if b"name" in disposition and b"filename" not in disposition:
            field.append(disposition[b"name"].decode("utf-8", "replace"))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if field and sum(map(len, value)) < _MAX_FIELD:
            value.append(data[start:end])

    def on_part_end() -> None:
        if field:
            fields[field[0]] = b"".join(value)[:_MAX_FIELD].decode("utf-8", "replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own error types, all malformed input
        raise InvalidRequestError(f"The multipart body is malformed: {exc}.") from None
    return fields
