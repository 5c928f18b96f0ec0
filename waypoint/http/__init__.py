"""HTTP for the waypoint: the message types every codec and filter shares (`message`), the
byte-stream seam the codecs run on (`stream`), and the codecs: HTTP/1.1 (`h1` sans-IO,
`h1server`, `h1client`), HTTP/2 with prior knowledge (`h2base`, `h2server`, `h2client`, on
the `h2` library), `splice` for upgraded and plain TCP streams, and `sniff` for ports whose
protocol was not declared."""
