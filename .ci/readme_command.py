"""Print the first command of the fenced code block that follows `<!-- MARKER -->` in a Markdown
file (backslash continuations joined), so CI runs exactly what the README tells users to run."""
import sys
from pathlib import Path


def command_after(markdown: str, marker: str) -> str:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if f"<!-- {marker} -->" in line)
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    command = []
    for line in lines[fence + 1:]:
        if line.startswith("```"):
            break
        command.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(command)


if __name__ == "__main__":
    print(command_after(Path(sys.argv[1]).read_text(), sys.argv[2]))
