from cptkit.cli import main

main()
