"""HTTP for the waypoint: the message types every codec and filter shares (`message`), the
byte-stream seam the codecs run on (`stream`), and the HTTP/1.1 and HTTP/2 codecs."""
