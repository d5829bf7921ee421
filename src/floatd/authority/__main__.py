from floatd.authority.cli import main

main()
