"""Weight formats of other projects, mapped onto this project's backbone and heads by declarative
key tables: BEiT (microsoft/unilm, timm, Hugging Face) in both directions."""
