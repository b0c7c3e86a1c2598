"""What chat.py and server.py promise, checked as a person would use them.

- Boxes: every whole, in-range `{<x1><y1><x2><y2>}` of an answer is found and drawn; broken ones
  are skipped.
- The chat: a conversation answered turn by turn from Phi-2's KV cache gives the same tokens as the
  whole conversation run at once (written out here in the stage's template, docs/PAPER.md section 9);
  a follow-up runs only its own tokens; an overflowing context drops the oldest turns; a stopped
  answer leaves a chat that goes on.
- The command line and the web page, on a demo model trained here for a few steps: answers equal
  the one-shot command's, boxes are drawn where the answer says (the canvas' pixels, in a real
  headless Chromium driven by Playwright), bad uploads are refused with their messages, and two
  visitors asking at once are both answered, in order.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from PIL import Image

import chat
import data
import demo
import server
import tinygptv as tg
from test_tinygptv import tiny_model, tok  # noqa: F401 (tok is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# Boxes


def test_boxes_are_parsed_from_good_edge_and_broken_answers():
    assert data.parse_boxes("{<70><4><96><30>}") == [(70, 4, 96, 30)]
    assert data.parse_boxes("a {<0><0><100><100>} and {<10><20><30><40>}.") == [(0, 0, 100, 100), (10, 20, 30, 40)]
    assert data.parse_boxes("{<50><60><10><20>}") == [(10, 20, 50, 60)]  # corners given the other way round
    for broken in ["", "no box", "{<71><89><25>}", "{<1><2><3><4>", "<1><2><3><4>}", "{<101><0><5><5>}",
                   "{<-1><0><5><5>}", "{<1.5><0><5><5>}", "{<a><b><c><d>}", "{<1><2><3><4><5>}"]:
        assert data.parse_boxes(broken) == [], broken
    assert data.parse_boxes("{<1><2><3>} {<120><0><1><1>} {<5><6><7><8>}") == [(5, 6, 7, 8)]  # the good one kept


def test_boxes_are_drawn_where_they_say():
    white = Image.new("RGB", (201, 101), (255, 255, 255))
    drawn = data.draw_boxes(white, [(10, 20, 50, 80), (0, 0, 100, 100)])
    assert drawn.getpixel((60, 20)) == (255, 0, 0)  # top edge of the first: x 10-50% of 200, y 20% of 100
    assert drawn.getpixel((20, 50)) == (255, 0, 0)  # its left edge
    assert drawn.getpixel((60, 50)) == (255, 255, 255)  # inside it
    assert drawn.getpixel((0, 0)) == drawn.getpixel((200, 100)) == (255, 0, 0)  # the whole picture's corners
    assert white.getpixel((60, 20)) == (255, 255, 255)  # the picture given is left alone


# -----------------------------------------------------------------------------
# The chat, on a tiny model with random weights

# The multi-turn conversation as docs/PAPER.md section 9 writes it; the image goes in the first question.
FOLLOW_UP = {3: "Human: {} ###Assistant: ", 4: "[INST] {} [/INST]"}


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)  # (tok: test_tinygptv's byte-level BPE of the prompts' words)


def picture(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy())


@torch.no_grad()
def at_once(model, tok, stage, image, history, instruction, n):
    """The answer's token ids to `instruction` after `history` [(instruction, answer ids with their end
    marker)], the whole conversation run through Phi-2 at once, with no cache from earlier turns."""
    first = tg.make_example(tok, stage, (history[0][0] if history else instruction))
    after = list(first.after)
    for k, (ins, answer) in enumerate(history + [(instruction, [])]):
        if k:
            after += tg.encode(tok, FOLLOW_UP[stage].format(ins))
        after += answer
    embed = model.llama_model.embed_tokens
    img = model.project(model.encode_queries(model.pixels([image], stage)))[0]
    x = torch.cat([embed(torch.tensor(first.before)), img, embed(torch.tensor(after))])[None]
    end = tg.END_MARKERS[stage]
    return model.llama_model.generate(inputs_embeds=x, max_new_tokens=n, stop_sequences=[tg.encode(tok, end),
                                                                                         tg.encode(tok, " " + end)])[0]


def closed(tok, stage, ids):
    """An answer's ids as the conversation keeps them: closed by the end marker (unless it already is)."""
    end = tg.encode(tok, tg.END_MARKERS[stage])
    return ids if ids[-len(end):] == end else ids + end


QUESTIONS = ["what color is the circle", "describe this image in detail", "the green triangle is at the top left"]


@pytest.mark.parametrize("stage", [3, 4])
def test_a_conversation_turn_by_turn_equals_it_run_at_once(model, tok, stage):
    c = chat.Chat(model, tok, stage, max_new_tokens=7)
    c.set_image(picture())
    history = []
    for q in QUESTIONS:
        pieces = list(c.ask(q))
        expected = at_once(model, tok, stage, picture(), history, q, 7)
        kept = c.turns[-1][1]
        assert closed(tok, stage, expected) == closed(tok, stage, kept[:len(expected)]), q
        assert "".join(pieces) == c.answer == tok.decode(expected).split(tg.END_MARKERS[stage])[0].strip()
        history.append((q, closed(tok, stage, expected)))
    assert len(c.turns) == 3 and c.dropped == 0


def test_a_follow_up_runs_only_its_own_tokens(model, tok, monkeypatch):
    c = chat.Chat(model, tok, 4, max_new_tokens=5)
    c.set_image(picture())
    list(c.ask(QUESTIONS[0]))
    fed, encoded = [], []
    llm = model.llama_model
    hidden, encode = llm.hidden_states, model.encode_queries
    monkeypatch.setattr(llm, "hidden_states", lambda *a, **k: fed.append(
        (k.get("inputs_embeds") if k.get("inputs_embeds") is not None else a[0]).shape[1]) or hidden(*a, **k))
    monkeypatch.setattr(model, "encode_queries", lambda *a: encoded.append(1) or encode(*a))
    list(c.ask(QUESTIONS[1]))
    new = 1 + len(tg.encode(tok, tg.END_MARKERS[4])) + len(tg.encode(tok, FOLLOW_UP[4].format(QUESTIONS[1])))
    assert fed[0] <= new and all(n == 1 for n in fed[1:]), fed  # not the picture's 32 vectors, nor turn 1 again
    assert encoded == []  # the picture was encoded once, for turn 1


def test_an_overflowing_context_drops_the_oldest_turns(model, tok):
    n = 6
    one_turn = 2 + 32 + len(tg.make_example(tok, 4, QUESTIONS[0]).after) + n  # bos + [INST] <Img>, picture, rest
    c = chat.Chat(model, tok, 4, max_new_tokens=n, context=one_turn + 40)
    c.set_image(picture())
    said = []
    for q in QUESTIONS * 2:
        list(c.ask(q))
        said.append(c.dropped)
        expected = at_once(model, tok, 4, picture(), c.turns[:-1], q, n)  # what is kept, run at once
        assert closed(tok, 4, expected) == closed(tok, 4, c.turns[-1][1][:len(expected)])
        assert c._length(c.turns) <= c.context
    assert any(said) and len(c.turns) < 6, said
    with pytest.raises(ValueError, match="too long"):
        c.ask("what color is the circle " * 40)


def test_a_stopped_answer_is_kept_so_far_and_the_chat_goes_on(model, tok, monkeypatch):
    c = chat.Chat(model, tok, 4, max_new_tokens=8)
    c.set_image(picture())
    calls, head = [], model.llama_model.lm_head
    forward = head.forward

    def interrupted(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third token's step
        return forward(x)
    monkeypatch.setattr(head, "forward", interrupted)
    pieces = c.ask(QUESTIONS[0])
    with pytest.raises(KeyboardInterrupt):
        list(pieces)
    monkeypatch.setattr(head, "forward", forward)
    assert len(c.turns) == 1 and len(c.turns[0][1]) == 2 + len(tg.encode(tok, tg.END_MARKERS[4]))  # 2 tokens + end
    list(c.ask(QUESTIONS[1]))  # the cache was cut mid-step: filled again from the conversation
    expected = at_once(model, tok, 4, picture(), c.turns[:1], QUESTIONS[1], 8)
    assert closed(tok, 4, expected) == closed(tok, 4, c.turns[1][1][:len(expected)])


# -----------------------------------------------------------------------------
# The command line and the web page, on the demo's model trained here for a few steps

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo run to stage 4, 60 steps a stage from the shipped stand-in backbones (about a minute):
    enough to answer [vqa] and write [refer] boxes about its example picture."""
    out = tmp_path_factory.mktemp("chat") / "run"
    r = subprocess.run([sys.executable, "train.py", "--out", str(out), "--stage", "4", "--steps", "60", "--no-eval",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    scene = demo.Split().scenes()["test"][0]  # the run's example.png
    return {"out": out, "image": out / "example.png", "shape": scene.objects[0].shape}


def one_shot(run, prompt):
    r = subprocess.run([sys.executable, "tinygptv.py", "--run", str(run["out"]), "--image", str(run["image"]),
                        "--prompt", prompt], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def test_the_command_line_chat_answers_as_the_one_shot_command_and_draws_boxes(run, tmp_path):
    vqa, refer = f"[vqa] what color is the {run['shape']}?", f"[refer] the {run['shape']}"
    lines = [vqa, "/temperature hot", "/image nowhere.png", "[nonsense] tag", "/restart", refer, "/quit", vqa]
    r = subprocess.run([sys.executable, "chat.py", "--run", str(run["out"]), "--draw", str(tmp_path / "boxes.png")],
                       cwd=ROOT, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = r.stdout.splitlines()
    assert answers == [one_shot(run, vqa), one_shot(run, refer)], r.stdout  # and nothing after /quit
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "hot" in errors[0] and "nowhere.png" in errors[1] and "[nonsense]" in errors[2], r.stderr
    boxes = data.parse_boxes(answers[1])
    assert boxes, answers[1]
    drawn, (x1, y1, x2, _) = Image.open(tmp_path / "boxes.png"), boxes[0]
    w, h = drawn.size
    assert drawn.getpixel((round((x1 + x2) / 2 * (w - 1) / 100), round(y1 * (h - 1) / 100))) == (255, 0, 0)


@pytest.fixture(scope="module")
def site(run):
    """server.py on a free loopback port, serving the run's model, for the tests' browsers."""
    model, tok, stage = demo.load_demo(str(run["out"]))
    listening = threading.Event()
    holder = {}

    def ready(srv):
        holder["server"] = srv
        listening.set()
    thread = threading.Thread(target=server.serve, args=(chat.Chat(model, tok, stage), "127.0.0.1", 0, ready), daemon=True)
    thread.start()
    assert listening.wait(60)
    yield f"http://127.0.0.1:{holder['server'].server_port}/"
    holder["server"].shutdown()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: apt-get install -y chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # (as root it needs --no-sandbox)
        yield b
        b.close()


def open_page(browser, site, image=None):
    page = browser.new_page(viewport={"width": 1000, "height": 560})
    page.goto(site)
    if image:
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('status').textContent.includes('ask')")
    return page


def ask(page, question, answers=1):
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.a[data-done]').length >= {answers}", timeout=120000)
    return page.query_selector_all(".a")[answers - 1]


def canvas_pixel(page, x, y):
    """The canvas' pixel at (x, y) of the picture's 0-100 coordinates."""
    return page.evaluate(f"""(() => {{ const c = document.getElementById('picture');
        return Array.from(c.getContext('2d').getImageData(Math.round({x} / 100 * (c.width - 1)),
                                                          Math.round({y} / 100 * (c.height - 1)), 1, 1).data); }})()""")


def test_the_page_streams_the_one_shot_answer(browser, site, run):
    page = open_page(browser, site, run["image"])
    question = f"[vqa] what color is the {run['shape']}?"
    answer = ask(page, question)
    assert answer.text_content() == one_shot(run, question)
    assert int(answer.get_attribute("data-pieces")) >= 1  # it came as streamed pieces
    assert page.text_content("#error") == ""
    page.close()


def test_the_page_draws_the_box_of_a_refer_answer_where_it_says(browser, site, run):
    page = open_page(browser, site, run["image"])
    question = f"[refer] the {run['shape']}"
    expected = one_shot(run, question)
    boxes = data.parse_boxes(expected)
    assert boxes, expected
    x1, y1, x2, y2 = boxes[0]
    edges = [((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2), (x2, (y1 + y2) / 2)]
    before = [canvas_pixel(page, x, y) for x, y in edges]
    assert ask(page, question).text_content() == expected
    after = [canvas_pixel(page, x, y) for x, y in edges]
    for b, a in zip(before, after):
        assert a[0] > 200 and a[1] < 80 and a[2] < 80 and a != b, (before, after)  # red now, not before
    page.click("#restart")  # start over: the box goes, the picture stays
    page.wait_for_function("document.getElementById('status').textContent.includes('new conversation')")
    assert [canvas_pixel(page, x, y) for x, y in edges] == before
    page.close()


def test_the_page_says_what_is_wrong_with_an_upload(browser, site, run, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(server.MAX_IMAGE_BYTES))
    text = tmp_path / "notes.png"
    text.write_text("not a picture at all")
    page = open_page(browser, site)
    for path, message in ((big, "limit is 10 MB"), (text, "not a picture")):
        page.set_input_files("#file", str(path))
        page.wait_for_function(f"document.getElementById('error').textContent.includes({json.dumps(message)})")
    page.fill("#question", "[vqa] what color is it?")  # and no picture was taken
    page.press("#question", "Enter")
    page.wait_for_function("document.getElementById('error').textContent.includes('no picture yet')")
    page.close()
    # the statuses behind the messages, and a malformed request
    for body, status in ((b"x" * (server.MAX_IMAGE_BYTES + 1), 413), (b"not a picture", 415)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(site + "api/image?v=statuses", data=body))
        assert e.value.code == status
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(site + "api/ask?v=statuses", data=b"{not json"))
    assert e.value.code == 400 and "JSON" in json.loads(e.value.read())["error"]
    urllib.request.urlopen(urllib.request.Request(site + "api/image?v=statuses", data=run["image"].read_bytes()))
    long = json.dumps({"question": "[vqa] " + "why " * server.MAX_QUESTION_CHARS}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(site + "api/ask?v=statuses", data=long))
    assert e.value.code == 413 and "characters" in json.loads(e.value.read())["error"]


def test_two_visitors_asking_at_once_are_both_answered_in_order(browser, site, run):
    first, second = open_page(browser, site, run["image"]), open_page(browser, site, run["image"])
    question = f"[refer] the {run['shape']}"
    for page in (first, second):  # one right after the other: the second waits for the first's answer
        page.fill("#question", question)
    first.press("#question", "Enter")
    second.press("#question", "Enter")
    done = []
    for page in (first, second):
        page.wait_for_function("document.querySelectorAll('.a[data-done]').length == 1", timeout=120000)
        answer = page.query_selector(".a")
        done.append((int(answer.get_attribute("data-ticket")), int(answer.get_attribute("data-answered")),
                     answer.text_content()))
    assert done[0][2] == done[1][2] == one_shot(run, question)
    # in the order the server took them (which of two pages' requests arrives first is the network's)
    (t1, n1, _), (t2, n2, _) = sorted(done)
    assert t1 < t2 and n1 < n2, done
    first.close()
    second.close()


def test_a_visitor_who_leaves_mid_answer_leaves_the_server_serving(site, run):
    image = run["image"].read_bytes()
    urllib.request.urlopen(urllib.request.Request(site + "api/image?v=leaver", data=image))
    stream = urllib.request.urlopen(urllib.request.Request(site + "api/ask?v=leaver",
                                                           data=json.dumps({"question": "[grounding] describe it"}).encode()))
    stream.readline()  # the first piece, then gone
    stream.close()
    urllib.request.urlopen(urllib.request.Request(site + "api/image?v=stayer", data=image))
    reply = urllib.request.urlopen(urllib.request.Request(site + "api/ask?v=stayer",
                                                          data=json.dumps({"question": "[vqa] what color is it?"}).encode()))
    events = [json.loads(line) for line in reply.read().splitlines() if line.strip()]
    assert events[-1].get("done") and events[-1]["answer"], events
