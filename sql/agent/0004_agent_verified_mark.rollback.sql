DROP TABLE dbsync.verify_mark;
