from floatd.cli import main

main()
