"""Echo: POST /echo returns the body unchanged; the WebSocket /echo sends every message back."""
from asok import Asok, Response

app = Asok(__file__)


@app.route("/echo", methods=["POST"], csrf=False)
def echo(request):
    content_type = request.headers.get("content-type", "application/octet-stream")
    return Response(request.body, content_type=content_type)


@app.websocket("/echo", max_size=16 * 1024 * 1024)
async def echo_socket(ws):
    async for message in ws:
        await ws.send(message)
