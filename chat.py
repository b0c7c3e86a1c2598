"""Talk to TinyGPT-V about a picture: a multi-turn chat that streams its answers, on the command line
or, with --serve, on a web page (server.py).

    python chat.py                                   # the demo's model, about its example picture
    python chat.py --image cat.jpg --phi2 DIR --blip2 DIR --checkpoint stage4.safetensors --int8
    python chat.py --serve --port 8000               # the same chat on a web page

A reader of the paper may skip this file: it is how a user talks to a trained model, built from
TinyGPTV's own pieces (`pixels`, `encode_queries`, `project`) and Phi-2's KV cache. What it does:
- `Chat`: one conversation about one picture. The picture is encoded once. The conversation is kept
  as token ids in the stage's template, built as the official chat builds it (docs/PAPER.md
  section 9): the first question joined to the picture, each answer closed by the stage's end
  marker, then the next question. Phi-2's KV cache holds the conversation so far, so a follow-up
  runs only its own new tokens. When the context would overflow, the oldest turns are dropped (the
  picture stays, joined to the oldest question kept) and the cache is filled again.
- `main`: the command line, with /image, /restart, /temperature, /top_p and /quit; Ctrl-C stops an
  answer, not the chat; --draw OUT.png outlines an answer's boxes on the picture.
"""

import os
import sys
from argparse import ArgumentTypeError

import torch

import data
import demo
import tinygptv as tg
from checkpoints import output_file, write_atomically
from cli import (ArgumentParser, add_weight_options, at_least, device_option, load_for_inference,
                 parse_user_prompt, probability, run_cli)
from phi2 import KVCache, Phi2

# A later turn's question, without the picture: the stage's template from where the end marker that
# closed the previous answer leaves off (stage 3's "###" is also where "###Human" begins).
FOLLOW_UP = {3: "Human: {} ###Assistant: ", 4: "[INST] {} [/INST]"}


class Chat:
    """One conversation about one picture, answered token by token.

        chat = Chat(model, tok, stage=4)
        chat.set_image(picture)
        for piece in chat.ask("[vqa] what color is the circle"):   # (chat.dropped: turns let go)
            print(piece, end="")
        chat.answer                                                 # the whole answer, as one string
    """

    def __init__(self, model, tok, stage, max_new_tokens=300, temperature=0.0, top_p=None, seed=0, context=None):
        if stage < 3:
            raise ValueError(f"a stage-{stage} model writes captions and was not taught to converse: "
                             "chat with a stage 3 or 4 checkpoint")
        self.model, self.tok, self.stage = model, tok, stage
        self.context = context or model.config.llm.max_position_embeddings
        if max_new_tokens >= self.context:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: the model's context is {self.context} tokens, "
                             "picture and question included")
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.end = tg.END_MARKERS[stage]
        self.stops = [tg.encode(tok, self.end), tg.encode(tok, " " + self.end)]  # (after a space it differs)
        self.image, self.answer, self.dropped = None, "", 0
        self.restart()

    def restart(self):
        """Forget the conversation; the picture stays."""
        self.turns = []  # (instruction, the answer's token ids ending in the end marker)
        self.cache = KVCache()  # holds the first cache.length positions of the conversation
        self.generator = torch.Generator().manual_seed(self.seed)

    def resume(self, image, image_embeds, turns):
        """Take up a conversation kept elsewhere (server.py keeps one per visitor); the cache is filled
        again from it on the next turn."""
        self.image, self.image_embeds, self.turns, self.cache = image, image_embeds, turns, KVCache()

    @torch.no_grad()
    def set_image(self, image):
        """A PIL image: encoded once, through the vision tower, the Q-Former and the projections."""
        self.image_embeds = self.model.project(self.model.encode_queries(self.model.pixels([image], self.stage)))
        self.image = image
        self.restart()

    # -- the conversation as the model reads it
    def _ids(self, turns):
        """-> token ids before the picture, and after it: the first question, then each answer and the
        next question. The question being asked has answer []."""
        first = tg.make_example(self.tok, self.stage, turns[0][0])
        after = list(first.after)
        for k, (instruction, answer) in enumerate(turns):
            if k:
                after += tg.encode(self.tok, FOLLOW_UP[self.stage].format(instruction))
            after += answer
        return first.before, after

    def _length(self, turns):
        before, after = self._ids(turns)
        return len(before) + self.image_embeds.shape[1] + len(after)

    def _embeds(self, turns):
        """The whole conversation as Phi-2's input (1, T, C), the picture's 32 vectors in their place."""
        return self.model.assemble(self.image_embeds, [tg.Example(*self._ids(turns), answer=[])])[0]

    # -- a turn
    def ask(self, instruction):
        """Start answering `instruction` (what goes in the stage's template; cli.parse_user_prompt turns
        "[vqa] ..." into it) -> an iterator of the answer's text, piece by piece. Turns that no longer fit
        the context with a whole answer are dropped first, oldest first; self.dropped says how many."""
        if self.image is None:
            raise ValueError("no picture yet: give one first")
        turns, self.dropped = self.turns + [(instruction, [])], 0
        while self._length(turns) + self.max_new_tokens > self.context:
            if len(turns) == 1:
                raise ValueError(f"the question is too long: with the picture and room for an answer of "
                                 f"{self.max_new_tokens} tokens it does not fit the context of {self.context}")
            turns, self.dropped = turns[1:], self.dropped + 1
        if self.dropped:  # the conversation no longer starts as the cache does
            self.cache = KVCache()
        self.turns = turns
        return self._answer()

    @torch.no_grad()
    def _answer(self):
        llm, cache, ids, shown, finished = self.model.llama_model, self.cache, [], "", False
        seen = torch.zeros(1, llm.config.vocab_size, dtype=torch.bool, device=self.image_embeds.device)
        stop = None
        try:
            new = self._embeds(self.turns)[:, cache.length:]  # only what the cache does not hold yet
            logits = llm.lm_head(llm.hidden_states(inputs_embeds=new, kv_cache=cache)[:, -1])  # (1, vocab)
            for step in range(self.max_new_tokens):
                token = Phi2._next_token(logits.float(), seen, self.temperature, None, self.top_p, 1.0,
                                         [self.generator])  # (1,)
                ids.append(token.item())
                stop = next((s for s in self.stops if ids[-len(s):] == s), None)
                text = self._text(ids[:len(ids) - len(stop)] if stop else ids, final=stop is not None)
                if text.startswith(shown) and len(text) > len(shown):
                    yield text[len(shown):]
                    shown = text
                if stop or step == self.max_new_tokens - 1:
                    break
                logits = llm.lm_head(llm.hidden_states(token[:, None], kv_cache=cache)[:, -1])  # (1, vocab)
            finished = True
        finally:  # also when stopped (Ctrl-C, a visitor gone): what was said so far is the turn's answer
            self.answer = self._text(ids[:len(ids) - len(stop)] if stop else ids, final=True)
            self.turns[-1] = (self.turns[-1][0], ids if stop else ids + self.stops[0])  # closed by the end marker
            if not finished:  # a step may have stopped half way through the cache: fill it again next turn
                self.cache = KVCache()
        if self.answer.startswith(shown) and len(self.answer) > len(shown):
            yield self.answer[len(shown):]

    def _text(self, ids, final):
        """The answer so far as the one-shot command prints it: decoded, cut at the end marker, stripped.
        Unless final, what may still change is held back: a character half decoded, the start of the
        end marker, trailing spaces."""
        text = self.tok.decode(ids).split(self.end)[0].lstrip()
        if final:
            return text.rstrip()
        text = text.rstrip("\ufffd")
        for k in range(len(self.end) - 1, 0, -1):
            if text.endswith(self.end[:k]):
                text = text[:-k]
                break
        return text.rstrip()


# -----------------------------------------------------------------------------
# python chat.py

COMMANDS = """/image PATH      talk about another picture (the conversation starts over)
/restart         start the conversation over, same picture
/temperature T   0 is greedy (the default); the official chat samples at 1.0 with top-p 0.9
/top_p P         sample from the smallest set of tokens holding P of the probability (off: all)
/quit            leave (so does Ctrl-D); Ctrl-C stops an answer"""


def command(chat, line, say):
    """One /command; False for /quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/image":
        if not arg:
            raise ValueError("/image needs the picture's path: /image cat.jpg")
        chat.set_image(data.load_image(os.path.expanduser(arg)))
        say(f"(now about {arg}; a new conversation)")
    elif name == "/restart":
        chat.restart()
        say("(a new conversation about the same picture)")
    elif name == "/temperature":
        chat.temperature = at_least(0.0, float)(arg)
        say(f"(temperature {chat.temperature})")
    elif name == "/top_p":
        chat.top_p = None if arg in ("off", "none", "1") else probability(arg)
        say(f"(top-p {chat.top_p or 'off'})")
    else:
        say(COMMANDS)
    return True


def converse(chat, lines, say, write, draw=None):
    """The chat loop over input lines (from the terminal, or a test): each answer written as it comes."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(chat, line, say):
                    return
                continue
            pieces = chat.ask(parse_user_prompt(line) if chat.stage >= 3 else "")
        except (ValueError, OSError, ArgumentTypeError) as e:  # a bad command or question: said, and it goes on
            say(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if chat.dropped:
            say(f"(the context is full: the {chat.dropped} oldest turn(s) are forgotten)")
        try:
            for piece in pieces:
                write(piece)
        except KeyboardInterrupt:
            pieces.close()
            write(" [stopped]")
        write("\n")
        boxes = data.parse_boxes(chat.answer)
        if draw and boxes:
            write_atomically(draw, lambda tmp: data.draw_boxes(chat.image, boxes).save(tmp, format="PNG"))
            say(f"(drew {len(boxes)} box(es) in {draw})")


def terminal_lines(prompt):
    """Lines typed at the terminal; Ctrl-C at the prompt is not a way out (it stops answers)."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)")


def main(argv=None):
    p = ArgumentParser(prog="chat.py", description="Talk with TinyGPT-V about a picture, several questions in a "
                       "row. Without weight options it is the demo's model, which `python train.py` trains.")
    p.add_argument("--image", help="the picture (default: the demo run's example.png)")
    add_weight_options(p)
    p.add_argument("--device", type=device_option, default="cpu")
    p.add_argument("--max-new-tokens", type=at_least(1), default=300, help="the longest answer (as the official chat)")
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", metavar="OUT.png", help="outline the boxes of each answer that has some on the picture")
    p.add_argument("--force", action="store_true", help="let --draw replace an existing file")
    p.add_argument("--serve", action="store_true", help="serve the chat as a web page instead (server.py)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on")
    p.add_argument("--port", type=at_least(0), default=8000, help="--serve: the port (0: any free one)")
    a = p.parse_args(argv)
    if a.draw:
        output_file(a.draw, a.force, "the drawing")
    model, tok, stage = load_for_inference(a, dtype=torch.bfloat16 if a.int8 and a.phi2 else None, answers="many")
    chat = Chat(model, tok, stage, a.max_new_tokens, a.temperature, a.top_p, a.seed)
    if a.serve:
        import server
        return server.serve(chat, a.host, a.port)
    image = a.image or (None if a.phi2 or a.model else os.path.join(a.run or demo.DEMO_RUN, "example.png"))
    say = lambda text: print(text, file=sys.stderr, flush=True)
    if image:
        chat.set_image(data.load_image(image))
    say(f"TinyGPT-V, stage {stage}: ask about {image or 'a picture: /image PATH first'}\n{COMMANDS}")
    converse(chat, terminal_lines("> " if sys.stdin.isatty() else ""), say,
             lambda text: print(text, end="", flush=True), a.draw)


if __name__ == "__main__":
    run_cli(main)
