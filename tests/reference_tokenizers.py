"""Independent reference tokenizers for tests: the published algorithms written out plainly."""

import json

import regex


class ReferenceGPT2BPE:
    """The GPT-2 byte-level BPE algorithm written out plainly: an independent check of the Rust path."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_file, merge_file):
        self.encoder = json.loads(open(vocab_file, encoding="utf-8").read())
        merges = open(merge_file, encoding="utf-8").read().split("\n")[1:-1]
        self.ranks = {tuple(merge.split()): rank for rank, merge in enumerate(merges)}
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        printable += list(range(ord("®"), ord("ÿ") + 1))
        shifted = [byte for byte in range(256) if byte not in printable]
        self.byte_to_char = {byte: chr(byte) for byte in printable}
        self.byte_to_char.update({byte: chr(256 + n) for n, byte in enumerate(shifted)})

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            best = next(pair for pair in zip(parts, parts[1:]) if self.ranks.get(pair) == rank)
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        ids = []
        for piece in self.PATTERN.findall(text):
            word = "".join(self.byte_to_char[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids
