# sourced: vLLM's router as the overhead bench's peer, from /root/site (no network here)
for t in . /root/before; do
  mkdir -p $t/.venv-peers/vllm-router/bin
  ln -sf "$(command -v python3)" $t/.venv-peers/vllm-router/bin/python
  touch "$t/.venv-peers/vllm-router/.installed-vllm-router==0.1.17"
done
