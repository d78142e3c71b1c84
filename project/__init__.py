"""jtok: language models with token-indexed parameters (JTok, JTok-M) on dense and MoE backbones."""
