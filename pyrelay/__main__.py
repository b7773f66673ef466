from pyrelay.cli import main

main()
