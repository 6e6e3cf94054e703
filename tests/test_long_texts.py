"""Long texts without a database or a server: token counts, chunking.split/truncate on the
bundled model's real tokenizer, and pieces.Pieces (what is sent for which row)."""
import numpy as np
import pytest

from embed_helpers.backends.local import bundled_model_path
from embed_helpers.chunking import split, truncate
from embed_helpers.constants import LONG_TEXT_EXAMPLES, SAMPLE_DIR
from embed_helpers.csv_rows import read_csv_columns
from embed_helpers.errors import ConfigError
from embed_helpers.identity import Identity
from embed_helpers.pieces import Pieces
from embed_helpers.tokens import EstimatedTokens, TokenizerCount, Window
from fake_server import count_tokens

WINDOW, OVERLAP = 254, 32
SENTENCE_END = ".!?;:"


@pytest.fixture(scope="module")
def tok():
    return TokenizerCount(bundled_model_path() / "tokenizer.json")


@pytest.fixture(scope="module")
def abstracts(tok):
    """(ids, texts, token counts) of the real PubMed sample."""
    rows = read_csv_columns(SAMPLE_DIR / "pubmed" / "abstracts.csv", "pmid", "text")
    return rows["pmid"], rows["text"], tok.count(rows["text"])


@pytest.fixture(scope="module")
def window(tok):
    return Window(WINDOW, tok, "test window")


def long_ones(abstracts, n=None):
    ids, texts, counts = abstracts
    found = [(i, t, c) for i, t, c in zip(ids, texts, counts) if c > WINDOW]
    return found[:n]


def short_ones(abstracts, n):
    ids, texts, counts = abstracts
    return [(i, t, c) for i, t, c in zip(ids, texts, counts) if c <= WINDOW][:n]


# ---- chunking on real tokenizer units -----------------------------------------------------

def test_split_chunks_fit_cover_overlap_and_end_at_sentences(tok, abstracts):
    long = long_ones(abstracts)
    assert len(long) > 100  # the sample has many abstracts over the window
    inner_ends = sentence_ends = 0
    for _id, text, _count in long:
        spans = split(text, tok.units(text), WINDOW, OVERLAP)
        assert len(spans) >= 2
        assert all(n <= WINDOW for n in tok.count([text[s:e] for s, e in spans]))  # re-counted
        assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())  # whole text covered
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s1 < s2 < e1 < e2  # neighbours overlap, no gap
            shared = tok.count([text[s2:e1]])[0]
            assert 0 < shared <= OVERLAP
            inner_ends += 1
            sentence_ends += text[e1 - 1] in SENTENCE_END
    assert sentence_ends >= 0.95 * inner_ends  # ends prefer sentence ends


def test_split_without_overlap_leaves_no_gap_and_shares_nothing(tok, abstracts):
    _id, text, _count = long_ones(abstracts, 1)[0]
    spans = split(text, tok.units(text), WINDOW, 0)
    for (_s1, e1), (s2, _e2) in zip(spans, spans[1:]):
        assert e1 <= s2 and text[e1:s2].strip() == ""


def test_split_moves_the_end_back_to_a_sentence_end_near_it(tok):
    first = " ".join(["alpha"] * 23) + "."  # 24 tokens: ends in the window's last 30%
    text = first + " " + " ".join(["word"] * 40) + "."
    assert tok.count([first, text]) == [24, 65]
    spans = split(text, tok.units(text), 30, 0)
    assert text[slice(*spans[0])] == first and spans[-1][1] == len(text)
    # a sentence end early in the window is not worth a short chunk: the window is filled
    early = "Short one. " + " ".join(["word"] * 40) + "."
    span = split(early, tok.units(early), 30, 0)[0]
    assert tok.count([early[slice(*span)]]) == [30]


def test_a_text_that_fits_is_one_span(tok):
    text = "Penicillin allergy."
    assert split(text, tok.units(text), WINDOW, OVERLAP) == [(0, len(text))]
    assert truncate(tok.units(text), WINDOW, len(text)) == (0, len(text))


def test_truncate_keeps_exactly_the_tokens_the_model_reads(tok, abstracts):
    for _id, text, count in long_ones(abstracts, 20):
        start, end = truncate(tok.units(text), WINDOW, len(text))
        assert start == 0 and tok.count([text[:end]])[0] == WINDOW
        assert end == tok.units(text)[WINDOW - 1][1] < len(text)


# ---- estimates for the HTTP backends ------------------------------------------------------

def test_estimated_tokens_never_undercount_the_fake_servers_rule(abstracts, tok):
    _ids, texts, counts = abstracts
    odd = ["", "a", "é" * 7, "漢字かな" * 9, "🙂" * 5, "  spaced   out  ", "x" * 1001]
    estimate = EstimatedTokens()
    for text, n in zip(texts + odd, estimate.count(texts + odd)):
        assert n >= count_tokens(text), text[:40]
    assert all(e >= c for e, c in zip(estimate.count(texts), counts))  # and the real tokenizer


def test_chunks_of_estimated_units_fit_the_servers_count(abstracts):
    estimate = EstimatedTokens()
    for _id, text, _count in long_ones(abstracts, 30):
        spans = split(text, estimate.units(text), 100, 10)
        assert len(spans) > 2
        pieces = [text[s:e] for s, e in spans]
        assert max(count_tokens(p) for p in pieces) <= 100
        assert max(estimate.count(pieces)) <= 100


# ---- Pieces ---------------------------------------------------------------------------------

def test_rows_under_the_window_are_one_whole_piece(abstracts, window):
    ids, texts, _counts = zip(*short_ones(abstracts, 10))
    pieces = Pieces(list(ids), list(texts), window, "chunk", OVERLAP)
    assert pieces.spans == [[(0, len(t))] for t in texts]
    assert pieces.texts == list(texts)  # the very texts: their cache keys are unchanged
    identity = Identity("local", "m", 384, True)
    assert identity.keys(pieces.texts) == identity.keys(texts)
    assert pieces.long.over == 0 and pieces.failed == []


def test_long_rows_split_under_chunk(abstracts, window, tok):
    rows = long_ones(abstracts, 3) + short_ones(abstracts, 2)
    ids, texts, _counts = (list(x) for x in zip(*rows))
    pieces = Pieces(ids, texts, window, "chunk", OVERLAP)
    for row, text in enumerate(texts[:3]):
        spans = pieces.spans[row]
        assert len(spans) >= 2 and spans == split(text, tok.units(text), WINDOW, OVERLAP)
        assert all(text[s:e] in pieces.texts for s, e in spans)
    assert pieces.long.over == 3 and pieces.long.chunks == sum(len(s) for s in pieces.spans[:3])
    assert len(pieces.texts) == pieces.long.chunks + 2
    assert max(tok.count(pieces.texts)) <= WINDOW


def test_long_rows_cut_under_truncate(abstracts, window, tok):
    ids, texts, _counts = (list(x) for x in zip(*long_ones(abstracts, 3)))
    pieces = Pieces(ids, texts, window, "truncate", OVERLAP)
    for row, text in enumerate(texts):
        cut = truncate(tok.units(text), WINDOW, len(text))
        assert pieces.spans[row] == [cut] and pieces.texts[row] == text[:cut[1]]
    assert pieces.long.over == 3 and pieces.long.chunks == 0 and pieces.failed == []


def test_long_rows_fail_under_fail_with_their_count_and_the_window(abstracts, window):
    (lid, ltext, lcount), (sid, stext, _) = long_ones(abstracts, 1)[0], short_ones(abstracts, 1)[0]
    pieces = Pieces([sid, lid], [stext, ltext], window, "fail", OVERLAP)
    assert pieces.texts == [stext] and pieces.spans[1] == []
    [(row, reason)] = pieces.failed
    assert row == 1 and f"has {lcount} tokens" in reason and "window of 254" in reason
    assert "EMBED_LONG_TEXTS=fail" in reason
    estimated = Pieces([lid], [ltext], Window(WINDOW, EstimatedTokens(), "guess"), "fail")
    assert "(estimated)" in estimated.failed[0][1]
    with pytest.raises(ConfigError) as err:
        Pieces([lid], [ltext], window, "cut")
    assert err.value.variable == "EMBED_LONG_TEXTS"


def test_identical_texts_are_sent_once(abstracts, window):
    (_, short, _), (_, other, _) = short_ones(abstracts, 2)
    _lid, long, _ = long_ones(abstracts, 1)[0]
    pieces = Pieces(["a", "b", "c", "d", "e"], [short, short, other, long, long], window)
    assert len(pieces.texts) == 2 + len(pieces.spans[3]) == len(set(pieces.texts))
    vectors = unit_rows(len(pieces.texts))
    done = pieces.assembly().deliver(pieces.texts, vectors)
    assert sorted(done.rows) == [0, 1, 2, 3, 4]  # every row once
    by_row = dict(zip(done.rows, done.vectors))
    assert np.array_equal(by_row[0], by_row[1]) and np.array_equal(by_row[3], by_row[4])


def unit_rows(n, dim=8, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_split_row_completes_when_all_its_chunks_arrived(abstracts, window):
    _lid, long, _ = next(r for r in long_ones(abstracts) if r[2] > 2 * WINDOW)
    (_sid, short, _), = short_ones(abstracts, 1)
    pieces = Pieces(["long", "short"], [long, short], window, "chunk", OVERLAP)
    spans = pieces.spans[0]
    assert len(spans) >= 3
    chunk_texts = [long[s:e] for s, e in spans]
    vectors = unit_rows(len(spans))
    run = pieces.assembly()
    early = run.deliver(chunk_texts[:-1] + [short], np.vstack([vectors[:-1], unit_rows(1)]))
    assert early.rows == [1] and early.chunks == []  # the short row, not the long one yet
    done = run.deliver(chunk_texts[-1:], vectors[-1:])
    assert done.rows == [0]
    mean = vectors.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(done.vectors[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert np.linalg.norm(done.vectors[0]) == pytest.approx(1.0, abs=1e-6)
    assert [c[:4] for c in done.chunks] == [(0, k, s, e) for k, (s, e) in enumerate(spans)]
    for k, chunk in enumerate(done.chunks):
        assert np.array_equal(chunk[4], vectors[k])


def test_fail_kills_every_row_containing_the_text(abstracts, window):
    (_, short, _), (_, other, _) = short_ones(abstracts, 2)
    _lid, long, _ = long_ones(abstracts, 1)[0]
    longer = long + " One more closing sentence."
    pieces = Pieces(list("abcde"), [short, short, other, long, longer], window)
    first = long[slice(*pieces.spans[3][0])]
    assert first == longer[slice(*pieces.spans[4][0])]  # both long rows start alike
    run = pieces.assembly()
    assert run.fail(short) == [0, 1] and run.fail(short) == []
    assert run.fail(first) == [3, 4]
    done = run.deliver(pieces.texts, unit_rows(len(pieces.texts)))
    assert done.rows == [2]


def test_a_second_run_of_the_same_pieces_completes_every_row_again(abstracts, window):
    """Run state belongs to the run: the plan's pieces are never used up."""
    _lid, long, _ = next(r for r in long_ones(abstracts) if r[2] > 2 * WINDOW)
    (_sid, short, _), = short_ones(abstracts, 1)
    pieces = Pieces(["long", "short"], [long, short], window, "chunk", OVERLAP)
    vectors = unit_rows(len(pieces.texts))
    first = pieces.assembly()
    first.deliver(pieces.texts[:1], vectors[:1])  # a run that died after one chunk
    again = pieces.assembly().deliver(pieces.texts, vectors)
    assert sorted(again.rows) == [0, 1] and len(again.chunks) == len(pieces.spans[0])
    assert first.deliver(pieces.texts, vectors).rows == [0, 1]


def test_long_texts_figures(abstracts, window, tok):
    ids, texts, counts = abstracts
    pieces = Pieces(list(ids), list(texts), window, "chunk", OVERLAP)
    long = long_ones(abstracts)
    longest = max(long, key=lambda r: r[2])
    beyond = sum(len(t) - tok.units(t)[WINDOW - 1][1] for _i, t, _c in long)
    rows = dict(pieces.long.as_rows())
    assert rows == {
        "window, from": "assumed: test window",
        "texts over the 254-token window": len(long),
        "longest text, tokens": f"{longest[2]} (id {longest[0]})",
        "characters beyond the window": f"{beyond / sum(map(len, texts)):.1%}",
        "long texts (EMBED_LONG_TEXTS=chunk)": f"split into {pieces.long.chunks} chunks",
        "long text ids, e.g.": ", ".join(r[0] for r in long[:LONG_TEXT_EXAMPLES]),
    }
    assert pieces.long.share_beyond == pytest.approx(beyond / sum(map(len, texts)))
    short = Pieces(["a"], ["fits"], window)
    assert short.long.as_rows() == [("window, from", "assumed: test window"),
                                    ("texts over the 254-token window", 0)]
    estimated = Pieces(["a"], ["x" * 2000], Window(WINDOW, EstimatedTokens(), "guess"), "fail")
    assert dict(estimated.long.as_rows())["long texts (EMBED_LONG_TEXTS=fail)"] == \
        "listed as failures"
    assert "texts over the 254-token window (estimated)" in dict(estimated.long.as_rows())
