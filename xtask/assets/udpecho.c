/* Tiny static UDP tool for the test image (busybox nc has no UDP).
 *   udpecho serve PORT                 echo every datagram back, prefixed "echo:"
 *   udpecho send HOST PORT SPORT MSG   send MSG from source port SPORT, print the
 *                                      reply; exit 1 after 2 s without one */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int bound(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); exit(2); }
    return fd;
}

int main(int argc, char **argv) {
    char buf[1500];
    if (argc == 3 && !strcmp(argv[1], "serve")) {
        int fd = bound(atoi(argv[2]));
        for (;;) {
            struct sockaddr_in peer; socklen_t len = sizeof peer;
            ssize_t n = recvfrom(fd, buf + 5, sizeof buf - 5, 0, (struct sockaddr *)&peer, &len);
            if (n < 0) continue;
            memcpy(buf, "echo:", 5);
            sendto(fd, buf, n + 5, 0, (struct sockaddr *)&peer, len);
        }
    }
    if (argc == 6 && !strcmp(argv[1], "send")) {
        int fd = bound(atoi(argv[4]));
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &to.sin_addr);
        struct timeval tv = {.tv_sec = 2};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        sendto(fd, argv[5], strlen(argv[5]), 0, (struct sockaddr *)&to, sizeof to);
        ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
        if (n < 0) { fprintf(stderr, "no reply\n"); return 1; }
        buf[n] = 0;
        printf("%s\n", buf);
        return 0;
    }
    fprintf(stderr, "usage: udpecho serve PORT | udpecho send HOST PORT SPORT MSG\n");
    return 2;
}
