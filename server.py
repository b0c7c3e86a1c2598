"""The chat as a web page, served by Python's standard library: `python chat.py --serve`.

A reader of the paper may skip this file. One model serves every visitor, one answer at a time: a
visitor's question waits its turn in a queue (the page says how many answers are ahead) and its
answer streams back as it is generated. The page (chat.html, one file, no external scripts, fonts
or CDNs) shows the picture, the conversation, and the boxes of an answer drawn on the picture.

The API, all under /api/, a visitor named by ?v=ID (a random id the page makes):
    POST /api/image    the picture's bytes             -> {"width", "height"}
    POST /api/ask      {"question": "[vqa] ..."}       -> one JSON object per line, streamed:
                       {"wait": n} while n answers are ahead, {"text": piece} as the answer grows,
                       then {"done": true, "answer", "boxes": [[x1, y1, x2, y2], ...], "dropped": n,
                       "ticket": its place in the queue, "answered": answers made so far, this one included}
                       (or {"error": message})
    POST /api/restart  the conversation starts over, same picture
Bad input (a picture too large or not a picture, a question too long, a malformed request) gets an
error status and {"error": message}; a visitor who leaves mid-answer stops it. The server goes on.
"""

import io
import json
import os
import queue
import re
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from PIL import Image

import data
from cli import parse_user_prompt

MAX_IMAGE_BYTES = 10 << 20  # 10 MB: a phone photo fits; the model sees 224 or 448 px anyway
MAX_QUESTION_CHARS = 2000
MAX_VISITORS = 64  # conversations kept; the oldest is forgotten beyond that
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class Refused(Exception):
    """Bad input: answered with this HTTP status and message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Job:
    """One question on its way through the model thread; `events` carries its answer back."""

    def __init__(self, ticket, visitor, instruction):
        self.ticket, self.visitor, self.instruction = ticket, visitor, instruction
        self.events = queue.Queue()  # dicts, then None at the end
        self.gone = False  # the visitor left: stop (or never start) answering


class Visitor:
    """One visitor's conversation, kept while the chat serves others."""

    def __init__(self):
        self.image, self.image_embeds, self.turns = None, None, []


class App:
    def __init__(self, chat):
        self.chat, self.jobs, self.visitors = chat, queue.Queue(), OrderedDict()
        self.taken = self.serving = self.answered = 0  # tickets given out, the one answered now, answers made
        self.talking_with = None  # whose conversation the chat's KV cache holds
        self.lock = threading.Lock()  # for the visitors, which every request's thread looks up
        with open(PAGE, "rb") as f:
            self.page = f.read()

    def visitor(self, query):
        vid = (parse_qs(query).get("v") or [""])[0]
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", vid):
            raise Refused(400, "a request needs ?v=ID, the visitor's id (letters, digits and -)")
        with self.lock:
            if vid not in self.visitors:
                self.visitors[vid] = Visitor()
                while len(self.visitors) > MAX_VISITORS:
                    self.visitors.popitem(last=False)
            self.visitors.move_to_end(vid)
            return self.visitors[vid]

    def forget(self, visitor):
        """The visitor's conversation starts over (with `image`, a new picture)."""
        visitor.turns = []
        if self.talking_with is visitor:
            self.talking_with = None

    def take_picture(self, visitor, body):
        try:
            with Image.open(io.BytesIO(body)) as im:
                visitor.image = data.to_rgb(im, "the picture")
        except Image.DecompressionBombError:
            raise Refused(413, "the picture has too many pixels") from None
        except Exception:  # Pillow raises many kinds for what is not a picture
            raise Refused(415, "that is not a picture Pillow can read (PNG, JPEG, GIF, WebP, BMP...)") from None
        visitor.image_embeds = None
        self.forget(visitor)
        return {"width": visitor.image.width, "height": visitor.image.height}

    def ask(self, visitor, instruction):
        """-> a Job, queued for the model thread."""
        with self.lock:
            job = Job(self.taken, visitor, instruction)
            self.taken += 1
        self.jobs.put(job)
        return job

    def model_loop(self):
        """Every answer is made here, one at a time, in the order asked, until a None job. serve()
        runs it on the thread that called it (the main one), not on the request's: torch's OpenMP
        workers wait spinning for the main thread's next operation but asleep for any other's, and
        waking them at each operation made the demo model's first token 3x as slow on another thread
        (8.0 against 2.7 ms, 2 threads; with 1 thread 2.9 ms)."""
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.serving = job.ticket
            try:
                if not job.gone:
                    self.answer(job.visitor, job.instruction, job)
            except ValueError as e:  # the question does not fit the context, even alone
                job.events.put({"error": str(e)})
            except Exception as e:  # a fault of ours: said, and the next visitor is served
                job.events.put({"error": f"the model failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            finally:
                job.events.put(None)

    def answer(self, visitor, instruction, job):
        """The visitor's conversation into the chat, the answer streamed into job.events."""
        chat = self.chat
        if self.talking_with is not visitor:  # another's conversation is in the cache: this one's comes back
            if visitor.image_embeds is None:
                chat.set_image(visitor.image)
                visitor.image_embeds = chat.image_embeds
            chat.resume(visitor.image, visitor.image_embeds, visitor.turns)
            self.talking_with = visitor
        pieces = chat.ask(instruction)
        try:
            for piece in pieces:
                if job.gone:
                    break
                job.events.put({"text": piece})
        finally:
            pieces.close()  # (a visitor gone mid-answer: the answer so far is its turn)
            visitor.turns = chat.turns
        self.answered += 1
        job.events.put({"done": True, "answer": chat.answer, "boxes": data.parse_boxes(chat.answer),
                        "dropped": chat.dropped, "ticket": job.ticket, "answered": self.answered})


class Handler(BaseHTTPRequestHandler):
    app = None  # set by serve()

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def reply(self, status, payload, kind="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self, limit, what):
        """The request's body, at most `limit` bytes; a longer one is read and refused (so the browser
        gets the message rather than a broken connection), one far longer is not read at all."""
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(411, "the request needs a Content-Length") from None
        if n > limit:
            left = n if n <= 8 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            self.close_connection = True
            raise Refused(413, f"{what} is {n / 2 ** 20:.1f} MB; the limit is {limit / 2 ** 20:.0f} MB")
        return self.rfile.read(n)

    def do_GET(self):
        if urlparse(self.path).path in ("/", "/index.html"):
            return self.reply(200, self.app.page, "text/html; charset=utf-8")
        self.reply(404, {"error": f"no page {urlparse(self.path).path}"})

    def do_POST(self):
        url = urlparse(self.path)
        try:
            if url.path == "/api/image":
                picture = self.body(MAX_IMAGE_BYTES, "the picture")
                return self.reply(200, self.app.take_picture(self.app.visitor(url.query), picture))
            if url.path == "/api/restart":
                self.body(1 << 16, "the request")
                self.app.forget(self.app.visitor(url.query))
                return self.reply(200, {})
            if url.path == "/api/ask":
                return self.ask(self.app.visitor(url.query), self.body(4 * MAX_QUESTION_CHARS + 1024, "the question"))
            raise Refused(404, f"no API {url.path}")
        except Refused as e:
            self.reply(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):  # the visitor left
            pass

    def ask(self, visitor, raw):
        try:
            question = json.loads(raw).get("question")
        except (ValueError, AttributeError):
            raise Refused(400, 'send JSON: {"question": "..."}') from None
        if not isinstance(question, str) or not question.strip():
            raise Refused(400, "the question is empty: ask something, e.g. [vqa] what color is the circle")
        if len(question) > MAX_QUESTION_CHARS:
            raise Refused(413, f"the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
        if visitor.image is None:
            raise Refused(409, "no picture yet: choose or drop one first")
        try:
            instruction = parse_user_prompt(question)
        except ValueError as e:
            raise Refused(400, str(e)) from None
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.close_connection = True  # the end of the stream is the end of the connection

        def send(event):
            self.wfile.write(json.dumps(event).encode() + b"\n")
            self.wfile.flush()
        job, ahead = self.app.ask(visitor, instruction), None
        try:
            while True:
                try:
                    event = job.events.get(timeout=1.0)
                except queue.Empty:  # waiting its turn, or a long step: say so (a write finds a visitor gone)
                    now = job.ticket - self.app.serving
                    send({"wait": now} if now > 0 and now != ahead else {})
                    ahead = now
                    continue
                if event is None:
                    return
                send(event)
        finally:
            job.gone = True


def serve(chat, host="127.0.0.1", port=8000, ready=None):
    """Serve until Ctrl-C or server.shutdown(): requests on their own threads, the model on this one.
    ready(server), if given, is called once it listens (tests and bench.py take the port from it)."""
    app = Handler.app = App(chat)
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def listen():
        server.serve_forever()
        app.jobs.put(None)  # shut down: the model loop ends too
    threading.Thread(target=listen, daemon=True).start()
    print(f"TinyGPT-V chat on http://{host}:{server.server_port}/ (Ctrl-C stops it)", flush=True)
    if ready:
        ready(server)
    try:
        app.model_loop()
    finally:
        server.shutdown()  # (returns at once if it is shut down already)
        server.server_close()
