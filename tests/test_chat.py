"""Meta's chat formats, checked id by id against FACTS.md with the tiny real tokenizers."""
from __future__ import annotations


import pytest

from llama_gen.errors import UserError
from llama_gen.text.chat import (DialogError, chat_format_for, dialog_tokens, end_of_turn_ids,
                                 message_problem, reply_tokens, with_system)
from llama_gen.text.tokenizer import Tokenizer

BOS, EOS = 1, 2  # Llama 1/2's SentencePiece
# Llama 3's special tokens, numbered from the rank count (128000 in Meta's file).
BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOM, EOT = 0, 1, 6, 7, 8, 9
WORLD = "Grüße, 東京 🙂"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def special(tik: Tokenizer, offset: int) -> int:
    return tik.n_words - 256 + offset


def llama3_message(tik: Tokenizer, role: str, text: str) -> list[int]:
    return [special(tik, START_HEADER), *tik.encode(role, bos=False), special(tik, END_HEADER),
            *tik.encode("\n\n", bos=False), *tik.encode(text, bos=False), special(tik, EOT)]


def llama3_open(tik: Tokenizer) -> list[int]:
    return [special(tik, START_HEADER), *tik.encode("assistant", bos=False),
            special(tik, END_HEADER), *tik.encode("\n\n", bos=False)]


# --- message_problem ---------------------------------------------------------------------------

def test_a_well_formed_dialog_has_no_problem():
    assert message_problem([system("s"), user(""), assistant("a"), user("u")]) is None


@pytest.mark.parametrize("value, reason", [
    ("hi", "messages must be a list of {role, content} objects, got str"),
    ([], "messages is empty; give at least one user message"),
    ([user("a"), "b"], "messages[1] must be an object with role and content, got str"),
    ([{"content": "a"}], "messages[0] has no 'role'"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"role": 1, "content": "a"}], "messages[0] role must be a string, got 1"),
    ([{"role": "user", "content": ["a"]}], 'messages[0] content must be a string, got ["a"]'),
    ([{"role": "tool", "content": "a"}], 'messages[0] has unknown role "tool"; roles are system'),
    ([{"role": "User", "content": "a"}], 'messages[0] has unknown role "User"'),
    ([{"role": "user", "content": "a", "name": "x"}], 'messages[0] has key "name" besides role'),
])
def test_message_problem_names_the_message_and_the_fault(value, reason):
    assert message_problem(value).startswith(reason)


def test_a_role_with_a_newline_is_reported_on_one_line():
    assert "\n" not in message_problem([{"role": "us\ner", "content": "a"}])


# --- chat_format_for ---------------------------------------------------------------------------

def test_the_tokenizer_tells_the_family(spm, tik):
    assert chat_format_for(tik, 1e-5, None) == "llama3"
    assert chat_format_for(spm, 1e-5, None) == "llama2"


def test_llama1_has_no_chat_format(spm):
    with pytest.raises(UserError, match=r"Llama 1 .* no chat format.*--chat_format llama2"):
        chat_format_for(spm, 1e-6, None)


def test_a_requested_format_wins_over_norm_eps(spm, tik):
    assert chat_format_for(spm, 1e-6, "llama2") == "llama2"
    assert chat_format_for(tik, 1e-6, "llama3") == "llama3"


@pytest.mark.parametrize("kind, requested, fits", [("spm", "llama3", "llama2"),
                                                   ("tik", "llama2", "llama3")])
def test_a_format_without_its_special_tokens_is_refused(request, kind, requested, fits):
    with pytest.raises(UserError, match=f"--chat_format {requested} does not fit.*"
                                        f"pass --chat_format {fits}"):
        chat_format_for(request.getfixturevalue(kind), 1e-5, requested)


def test_an_unknown_requested_format_is_refused(tik):
    with pytest.raises(UserError, match='must be llama2, llama3 or template, got "chatml"'):
        chat_format_for(tik, 1e-5, "chatml")


def test_an_unfamiliar_sentencepiece_checkpoint_asks_for_the_flag(spm):
    with pytest.raises(UserError, match="norm_eps 1e-08.*pass --chat_format llama2"):
        chat_format_for(spm, 1e-8, None)


# --- with_system -------------------------------------------------------------------------------

def test_with_system_adds_a_leading_system_message():
    dialog = [user("u")]
    assert with_system(dialog, "Be brief.") == [system("Be brief."), user("u")]
    assert dialog == [user("u")]


def test_with_system_keeps_the_dialogs_own_and_none_adds_nothing():
    assert with_system([system("own"), user("u")], "flag") == [system("own"), user("u")]
    assert with_system([user("u")], None) == [user("u")]


def test_with_system_leaves_a_dialog_with_a_later_system_message_to_be_refused(tik):
    dialog = [user("a"), system("own"), user("b")]
    assert with_system(dialog, "flag") == dialog
    with pytest.raises(DialogError, match=r"^messages\[1\] has role \"system\""):
        dialog_tokens(with_system(dialog, "flag"), "llama3", tik)


@pytest.mark.parametrize("fmt", ["llama2", "llama3"])
def test_an_added_system_message_encodes_as_the_dialogs_own(spm, tik, fmt):
    tokenizer = spm if fmt == "llama2" else tik
    added = dialog_tokens(with_system([user(WORLD)], "Be brief."), fmt, tokenizer)
    assert added == dialog_tokens([system("Be brief."), user(WORLD)], fmt, tokenizer)


def test_errors_after_with_system_name_the_records_own_indices(spm):
    with pytest.raises(DialogError, match=r"^messages\[1\] has role \"user\""):
        dialog_tokens(with_system([user("a"), user("b")], "s"), "llama2", spm)
    with pytest.raises(DialogError, match=r"^the system text .* contains \[INST\]"):
        dialog_tokens(with_system([user("a")], "[INST]"), "llama2", spm)


# --- Llama 2 -----------------------------------------------------------------------------------

def test_llama2_single_user_message(spm):
    ids = dialog_tokens([user("  Hello world \n")], "llama2", spm)
    assert ids == [BOS, *spm.encode("[INST] Hello world [/INST]", bos=False)]


def test_llama2_system_multi_turn_and_non_ascii(spm):
    dialog = [system("Be brief."), user(" Hi "), assistant(f" {WORLD}\n"), user(WORLD)]
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] " + WORLD + " "
    assert dialog_tokens(dialog, "llama2", spm) == [
        BOS, *spm.encode(first, bos=False), EOS,
        BOS, *spm.encode(f"[INST] {WORLD} [/INST]", bos=False)]


def test_llama2_reply_continues_the_prompt(spm):
    dialog = [system("Sys"), user("Hi"), assistant("Yo"), user("Und?"), assistant(f" {WORLD} ")]
    context, reply = reply_tokens(dialog, "llama2", spm)
    assert context == dialog_tokens(dialog[:-1], "llama2", spm)
    assert context + reply == [
        BOS, *spm.encode("[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST] Yo ", bos=False), EOS,
        BOS, *spm.encode(f"[INST] Und? [/INST] {WORLD} ", bos=False), EOS]
    assert spm.decode_continuation(context, reply) == f" {WORLD} "


@pytest.mark.parametrize("text", ["", "a", " x", "1", "\n\nend", "Hi there.", "東京", "🙂"])
def test_llama2_reply_boundary_holds_for_any_start(spm, text):
    dialog = [user("q"), assistant(text)]
    context, reply = reply_tokens(dialog, "llama2", spm)
    assert context + reply == [BOS, *spm.encode(f"[INST] q [/INST] {text.strip()} ", bos=False),
                               EOS]


# --- Llama 3 -----------------------------------------------------------------------------------

def test_llama3_single_user_message(tik):
    ids = dialog_tokens([user(" Hello world\n")], "llama3", tik)
    assert ids == [special(tik, BEGIN_OF_TEXT), *llama3_message(tik, "user", "Hello world"),
                   *llama3_open(tik)]


def test_llama3_system_multi_turn_and_non_ascii(tik):
    dialog = [system("Be brief."), user("Hi"), assistant(f"{WORLD}\n"), user(f" {WORLD}")]
    assert dialog_tokens(dialog, "llama3", tik) == [
        special(tik, BEGIN_OF_TEXT),
        *llama3_message(tik, "system", "Be brief."),
        *llama3_message(tik, "user", "Hi"),
        *llama3_message(tik, "assistant", WORLD),
        *llama3_message(tik, "user", WORLD),
        *llama3_open(tik)]


def test_llama3_special_token_text_in_content_stays_text(tik):
    ids = dialog_tokens([user("<|eot_id|><|start_header_id|>")], "llama3", tik)
    assert ids.count(special(tik, EOT)) == 1
    assert ids.count(special(tik, START_HEADER)) == 2


def test_llama3_needs_no_alternation(tik):
    ids = dialog_tokens([user("a"), user("b")], "llama3", tik)
    assert ids == [special(tik, BEGIN_OF_TEXT), *llama3_message(tik, "user", "a"),
                   *llama3_message(tik, "user", "b"), *llama3_open(tik)]


def test_llama3_reply_is_content_and_eot(tik):
    dialog = [system("S"), user("Hi"), assistant("Yo"), user("Und?"), assistant(f" {WORLD}\n")]
    context, reply = reply_tokens(dialog, "llama3", tik)
    assert context == dialog_tokens(dialog[:-1], "llama3", tik)
    assert reply == [*tik.encode(WORLD, bos=False), special(tik, EOT)]
    assert context + reply == [
        special(tik, BEGIN_OF_TEXT), *llama3_message(tik, "system", "S"),
        *llama3_message(tik, "user", "Hi"), *llama3_message(tik, "assistant", "Yo"),
        *llama3_message(tik, "user", "Und?"), *llama3_message(tik, "assistant", WORLD)]


# --- bad dialogs -------------------------------------------------------------------------------

BOTH_BAD = [
    ([], "messages is empty"),
    ([{"role": "tool", "content": "x"}], 'messages[0] has unknown role "tool"'),
    ([user("a"), assistant("b")],
     'the dialog ends with messages[1] of role "assistant"; the model\'s turn must follow a user'),
    ([system("s")], 'the dialog ends with messages[0] of role "system"'),
]
LLAMA2_BAD = [
    ([user("a"), user("b")], ('messages[1] has role "user" where the Llama 2 format needs '
                              '"assistant" (roles alternate user, assistant, ...)')),
    ([assistant("a"), user("b")], 'messages[0] has role "assistant" where the Llama 2 format'),
    ([system("s"), assistant("a"), user("b")], 'messages[1] has role "assistant" where'),
    ([user("a"), system("s"), user("b")],
     ('messages[1] has role "system" where the Llama 2 format needs "assistant" '
      "(a system message may only come first)")),
    ([user("a [INST] b")], "messages[0] contains [INST], a control tag of the Llama 2"),
    ([user("a"), assistant("[/INST]"), user("b")], "messages[1] contains [/INST]"),
    ([system("<<SYS>>"), user("b")], "messages[0] contains <<SYS>>"),
    ([user("x<</SYS>>")], "messages[0] contains <</SYS>>"),
]
LLAMA3_BAD = [
    ([user("a"), system("s"), user("b")],
     'messages[1] has role "system"; the Llama 3 format takes a system message only as the first'),
]


@pytest.mark.parametrize("dialog, reason", BOTH_BAD + LLAMA2_BAD)
def test_llama2_bad_dialogs(spm, dialog, reason):
    with pytest.raises(DialogError) as e:
        dialog_tokens(dialog, "llama2", spm)
    assert str(e.value).startswith(reason)


@pytest.mark.parametrize("dialog, reason", BOTH_BAD + LLAMA3_BAD)
def test_llama3_bad_dialogs(tik, dialog, reason):
    with pytest.raises(DialogError) as e:
        dialog_tokens(dialog, "llama3", tik)
    assert str(e.value).startswith(reason)


def test_llama3_takes_llama2_control_tags_as_text(tik):
    assert dialog_tokens([user("[INST] <<SYS>>")], "llama3", tik)


@pytest.mark.parametrize("fmt", ["llama2", "llama3"])
@pytest.mark.parametrize("dialog, reason", [
    ([user("a")], 'messages[0] has role "user"; scoring needs the assistant\'s reply as the last'),
    ([assistant("a")], "messages holds only the assistant's reply"),
    ([system("s"), assistant("a")],
     'the dialog before the reply ends with messages[0] of role "system"'),
    ([], "messages is empty"),
])
def test_scoring_needs_a_reply_after_a_user_message(spm, tik, fmt, dialog, reason):
    with pytest.raises(DialogError) as e:
        reply_tokens(dialog, fmt, spm if fmt == "llama2" else tik)
    assert str(e.value).startswith(reason)


def test_llama2_reply_with_a_control_tag_is_refused(spm):
    with pytest.raises(DialogError, match=r"messages\[1\] contains <<SYS>>"):
        reply_tokens([user("a"), assistant("<<SYS>>")], "llama2", spm)


# --- end of turn -------------------------------------------------------------------------------

def test_end_of_turn_ids(spm, tik):
    assert end_of_turn_ids("llama2", spm) == {EOS}
    assert end_of_turn_ids("llama3", tik) == {special(tik, EOT), special(tik, END_OF_TEXT),
                                               special(tik, EOM)}
