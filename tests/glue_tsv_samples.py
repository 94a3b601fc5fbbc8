"""Tiny GLUE files in each task's original layout (the download's headers, quoting and malformed rows) and what
`load_glue_dir` should read from them, for the tests of the TSV reader and of the GLUE script."""

from pathlib import Path

import pytest


def write_files(root: Path, folder: str, files: dict[str, list[str]]) -> Path:
    """Writes each file's lines, tab-separated as given, to `root/folder/`; returns the GLUE root."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


# Headers as in the GLUE download: checked against the real SST-2, CoLA and RTE files; the others as the Hub's builder
# and transformers' former GLUE processors read them (column names, label column, MRPC's byte-order mark).
MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER.replace("\tlabel1\tgold_label", "")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def mnli_row(index: int, premise: str, hypothesis: str, labels: list[str]) -> str:
    """A row of MNLI's layout: ids, genre, four parse trees, the two sentences, then label1... and gold_label."""
    parses = ["( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)"]
    return "\t".join([str(index), "31193", f"{index}n", "fiction", *parses, premise, hypothesis, *labels])


# task → (folder, files, expected splits: split → rows of (text values..., label, idx)).
LAYOUTS = {
    "cola": (
        "CoLA",
        {
            "train.tsv": [
                "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
                'l-93\t0\t*\tSusan whispered "Shut up.',  # unbalanced quote: must not swallow the next line
                "gj04\t1\t\tThe mechanical doll wriggled itself loose.",
            ],
            "dev.tsv": ["gj04\t0\t*\tThe more you eat, the most you want."],
            "test.tsv": ["index\tsentence", "0\tBill whistled past the house."],
        },
        {
            "train": [
                ("The sailors rode the breeze clear of the rocks.", 1, 0),
                ('Susan whispered "Shut up.', 0, 1),
                ("The mechanical doll wriggled itself loose.", 1, 2),
            ],
            "validation": [("The more you eat, the most you want.", 0, 0)],
            "test": [("Bill whistled past the house.", -1, 0)],
        },
    ),
    "sst2": (
        "SST-2",
        {
            "train.tsv": ["sentence\tlabel", "hide new secretions from the parental units \t0", '" funny \t1'],
            "dev.tsv": ["sentence\tlabel", "it 's a charming and often affecting journey . \t1"],
            "test.tsv": ["index\tsentence", "0\tuneasy mishmash of styles and genres ."],
        },
        {
            "train": [("hide new secretions from the parental units ", 0, 0), ('" funny ', 1, 1)],
            "validation": [("it 's a charming and often affecting journey . ", 1, 0)],
            "test": [("uneasy mishmash of styles and genres .", -1, 0)],
        },
    ),
    "mrpc": (
        "MRPC",
        {
            # The download script copies MSR's header, byte-order mark included, into train.tsv and dev.tsv.
            "train.tsv": ["\ufeff" + MRPC_HEADER, '1\t702876\t702977\tHe said "yes".\t"Yes," he said.'],
            "dev.tsv": ["\ufeff" + MRPC_HEADER, "0\t1355540\t1355592\tA b c.\tD e f."],
            "test.tsv": ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1089874\t1089925\tG h.\tI j."],
        },
        {
            "train": [('He said "yes".', '"Yes," he said.', 1, 0)],
            "validation": [("A b c.", "D e f.", 0, 0)],
            "test": [("G h.", "I j.", -1, 0)],
        },
    ),
    "qqp": (
        "QQP",
        {
            "train.tsv": [
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough?\t0",
                "402555\t536040\t536041\tHow do I learn to cook?",  # malformed: 4 of 6 fields
                "360472\t364011\t490273\tWhat causes stool color to change?\tWhat can cause stool to come out?\t1",
            ],
            "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tQ one?\tQ two?\t1"],
            "test.tsv": ["id\tquestion1\tquestion2", "0\tWhy?\tWhy not?"],
        },
        {
            # The skipped row keeps its number: `idx` is the position in the file, as the Hub's builder counts.
            "train": [
                ("How is the life of a math student?", "Which level of prepration is enough?", 0, 0),
                ("What causes stool color to change?", "What can cause stool to come out?", 1, 2),
            ],
            "validation": [("Q one?", "Q two?", 1, 0)],
            "test": [("Why?", "Why not?", -1, 0)],
        },
    ),
    "stsb": (
        "STS-B",
        {
            "train.tsv": [
                STSB_HEADER,
                "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000",
            ],
            "dev.tsv": [STSB_HEADER, "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA dog.\t0.8"],
            "test.tsv": [STSB_HEADER.replace("\tscore", ""), "0\tmain-news\theadlines\t2016\t0\tnone\tnone\tX.\tY."],
        },
        {
            "train": [("A plane.", "An air plane.", 5.0, 0)],
            "validation": [("A man.", "A dog.", pytest.approx(0.8), 0)],
            "test": [("X.", "Y.", -1.0, 0)],
        },
    ),
    "mnli": (
        "MNLI",
        {
            "train.tsv": [
                MNLI_TRAIN_HEADER,
                mnli_row(
                    0,
                    "Conceptually cream skimming has two basic dimensions.",
                    "Product and geography.",
                    ["neutral"] * 2,
                ),
                mnli_row(1, 'He said "no".', "He agreed.", ["contradiction"] * 2),
            ],
            "dev_matched.tsv": [
                MNLI_DEV_HEADER,
                mnli_row(0, "The new rights are nice.", "Everyone likes them.", ["neutral"] * 6),
            ],
            "dev_mismatched.tsv": [MNLI_DEV_HEADER, mnli_row(0, "Your gift helps.", "It helps.", ["entailment"] * 6)],
            "test_matched.tsv": [MNLI_TEST_HEADER, mnli_row(0, "Hierbas, ans seco.", "Hierbas is a name.", [])],
            "test_mismatched.tsv": [MNLI_TEST_HEADER, mnli_row(0, "What a day.", "A day.", [])],
        },
        {
            "train": [
                ("Conceptually cream skimming has two basic dimensions.", "Product and geography.", 1, 0),
                ('He said "no".', "He agreed.", 2, 1),
            ],
            "validation_matched": [("The new rights are nice.", "Everyone likes them.", 1, 0)],
            "validation_mismatched": [("Your gift helps.", "It helps.", 0, 0)],
            "test_matched": [("Hierbas, ans seco.", "Hierbas is a name.", -1, 0)],
            "test_mismatched": [("What a day.", "A day.", -1, 0)],
        },
    ),
    "qnli": (
        "QNLI",
        {
            "train.tsv": [
                "index\tquestion\tsentence\tlabel",
                "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\tnot_entailment",
                "1\tWhich missile batteries?\tThe Soviets deployed SA-2 batteries.\tentailment",
            ],
            "dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhat?\tThat.\tentailment"],
        },
        {
            "train": [
                ("When did the third Digimon series begin?", "Unlike the two seasons before it.", 1, 0),
                ("Which missile batteries?", "The Soviets deployed SA-2 batteries.", 0, 1),
            ],
            "validation": [("What?", "That.", 0, 0)],
        },
    ),
    "rte": (
        "RTE",
        {
            "train.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                '0\t"I will not seek your votes," he said.\tHe will run.\tnot_entailment',
                "1\tA place of sorrow.\tA place.\tentailment",
            ],
            "dev.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                "0\tDana Reeve died.\tReeve had an accident.\tnot_entailment",
            ],
            "test.tsv": ["index\tsentence1\tsentence2", "0\tMaude and Dora.\tThey saw a train."],
        },
        {
            "train": [
                ('"I will not seek your votes," he said.', "He will run.", 1, 0),
                ("A place of sorrow.", "A place.", 0, 1),
            ],
            "validation": [("Dana Reeve died.", "Reeve had an accident.", 1, 0)],
            "test": [("Maude and Dora.", "They saw a train.", -1, 0)],
        },
    ),
    "wnli": (
        "WNLI",
        {
            "train.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
                "1\tJohn couldn't see the stage.\tJohn is so tall.\t0",
            ],
            "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tThe drain is clogged.\tThe hair is clogged.\t0"],
        },
        {
            "train": [
                ("I stuck a pin through a carrot.", "The carrot had a hole.", 1, 0),
                ("John couldn't see the stage.", "John is so tall.", 0, 1),
            ],
            "validation": [("The drain is clogged.", "The hair is clogged.", 0, 0)],
        },
    ),
}
