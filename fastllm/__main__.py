from fastllm.cli import main

main()
