from eval.ablation.cli import main

main()
