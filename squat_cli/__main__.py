from squat_cli.cli import main

main()
